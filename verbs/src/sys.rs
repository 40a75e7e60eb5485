//! The only place `ferry-verbs` touches the `rdma-sys` bindings.
//!
//! The raw handle types are public so that the `as_raw()` escape hatches on the
//! safe wrappers have nameable return types; everything else (functions,
//! constants, attribute structs) is crate-private. Nothing here is safe to call
//! directly: every function is an `extern "C"` call (or an inline wrapper from
//! `rdma-sys` around a provider function pointer) with the usual libibverbs
//! contracts.

pub use rdma_sys::{ibv_context, ibv_cq, ibv_mr, ibv_pd, ibv_qp};

pub(crate) use rdma_sys::{
    ___ibv_query_port as ibv_query_port, ibv_access_flags, ibv_alloc_pd, ibv_close_device,
    ibv_create_cq, ibv_create_qp, ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_cq, ibv_destroy_qp,
    ibv_device, ibv_device_attr, ibv_free_device_list, ibv_get_device_guid, ibv_get_device_list,
    ibv_get_device_name, ibv_gid, ibv_modify_qp, ibv_mtu, ibv_open_device, ibv_poll_cq,
    ibv_port_attr, ibv_port_state, ibv_post_send, ibv_qp_attr, ibv_qp_attr_mask, ibv_qp_init_attr,
    ibv_qp_state, ibv_qp_type, ibv_query_device, ibv_query_gid, ibv_reg_mr, ibv_send_flags,
    ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_status, ibv_wr_opcode, rdma_t,
};

/// `IBV_LINK_LAYER_*` are `#define`s in `<infiniband/verbs.h>`, which bindgen
/// does not turn into constants here; values from rdma-core 44's verbs.h.
pub(crate) const IBV_LINK_LAYER_INFINIBAND: u8 = 1;
/// See [`IBV_LINK_LAYER_INFINIBAND`].
pub(crate) const IBV_LINK_LAYER_ETHERNET: u8 = 2;
