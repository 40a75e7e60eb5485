//! Where a migration's data threads run: on the CPUs local to the network device its
//! connections cross (its NUMA node, as hwloc sees the machine, through `hwlocality`), or
//! on the CPUs the operator named (`data_cpus`). A device hwloc does not place below part
//! of the machine (a virtual interface: veth, bridge, loopback; or one local to every CPU)
//! leaves the threads where the scheduler puts them, and the summary says why.

use std::net::IpAddr;
use std::sync::OnceLock;

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::{OSDeviceType, ObjectType};
use hwlocality::topology::builder::TypeFilter;
use hwlocality::Topology;

/// Data-thread placement of one migration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// CPUs the data threads are bound to; empty: not bound.
    pub cpus: Vec<usize>,
    /// Why, for the summary and the log.
    pub why: String,
}

/// The machine as hwloc sees it, with its I/O devices (built once).
fn topology() -> Result<&'static Topology, String> {
    static T: OnceLock<Result<Topology, String>> = OnceLock::new();
    T.get_or_init(|| {
        Topology::builder()
            .with_io_type_filter(TypeFilter::KeepImportant)
            .map_err(|e| e.to_string())?
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// `0-3,8` for `[0, 1, 2, 3, 8]`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Parses a CPU list (`0-3,8`), sorted and without repeats.
///
/// # Errors
///
/// Anything but comma-separated CPU numbers and ranges; an empty list.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("CPU list {s:?}: give CPU numbers and ranges, e.g. 0-3,8");
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b || b >= 4096 {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

/// The network interface holding address `ip`.
pub fn interface_of(ip: IpAddr) -> Option<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let a = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let a = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                IpAddr::from(a.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        if addr == ip {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The CPUs local to OS device `name` (a network interface or RDMA device) and why; no
/// CPUs when binding would not narrow anything.
///
/// # Errors
///
/// No topology, or a device hwloc does not place (virtual), with the reason.
pub fn local_cpus(name: &str) -> Result<Placement, String> {
    let topo = topology().map_err(|e| format!("hwloc found no topology: {e}"))?;
    let dev = topo
        .os_devices()
        .find(|d| d.name().is_some_and(|n| n.to_string_lossy() == name))
        .ok_or_else(|| {
            format!(
                "{name} is not a device hwloc places (a virtual interface: veth, bridge, loopback)"
            )
        })?;
    let anc = dev
        .first_non_io_ancestor()
        .ok_or_else(|| format!("{name} has no place in the topology"))?;
    let (Some(cpus), Some(nodes)) = (anc.cpuset(), anc.nodeset()) else {
        return Err(format!("{name} has no CPUs or NUMA nodes of its own"));
    };
    let list: Vec<usize> = cpus.iter_set().map(usize::from).collect();
    let all: Vec<usize> = topo
        .root_object()
        .cpuset()
        .map(|c| c.iter_set().map(usize::from).collect())
        .unwrap_or_default();
    let nodes: Vec<usize> = nodes.iter_set().map(usize::from).collect();
    if list == all {
        return Ok(Placement {
            cpus: Vec::new(),
            why: format!(
                "{name} is local to every CPU (NUMA node {}): not bound",
                cpu_list(&nodes)
            ),
        });
    }
    Ok(Placement {
        why: format!(
            "CPUs {} of NUMA node {}, local to {name}",
            cpu_list(&list),
            cpu_list(&nodes)
        ),
        cpus: list,
    })
}

/// The placement of a migration whose connections leave from `local` (this side's
/// address): the operator's `data_cpus` when set, else the CPUs local to its interface.
pub fn for_connection(data_cpus: &[usize], local: Option<IpAddr>) -> Placement {
    if !data_cpus.is_empty() {
        return Placement {
            cpus: data_cpus.to_vec(),
            why: format!("CPUs {} (data_cpus)", cpu_list(data_cpus)),
        };
    }
    let Some(name) = local.and_then(interface_of) else {
        return Placement {
            cpus: Vec::new(),
            why: "no interface found for the connection's address: not bound".into(),
        };
    };
    local_cpus(&name).unwrap_or_else(|why| Placement {
        cpus: Vec::new(),
        why: format!("{why}: not bound"),
    })
}

/// What `ferry devices` shows of the machine: NUMA nodes with their CPUs and memory,
/// then the network and RDMA devices with the CPUs local to them.
///
/// # Errors
///
/// hwloc found no topology.
pub fn describe() -> Result<Vec<String>, String> {
    let topo = topology()?;
    let mut lines = Vec::new();
    for n in topo.objects_with_type(ObjectType::NUMANode) {
        let mem = match n.attributes() {
            Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map_or(0, |m| m.get()),
            _ => 0,
        };
        let cpus: Vec<usize> = n
            .cpuset()
            .map(|c| c.iter_set().map(usize::from).collect())
            .unwrap_or_default();
        lines.push(format!(
            "NUMA node {}: CPUs {}, {} MiB",
            n.os_index().map_or_else(|| "?".into(), |i| i.to_string()),
            cpu_list(&cpus),
            mem >> 20
        ));
    }
    for d in topo.os_devices() {
        let kind = match d.attributes() {
            Some(ObjectAttributes::OSDevice(a)) => match a.device_type() {
                OSDeviceType::Network => "network",
                OSDeviceType::OpenFabrics => "RDMA",
                _ => continue,
            },
            _ => continue,
        };
        let name = d
            .name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let at = local_cpus(&name).map_or_else(|e| e, |p| p.why);
        lines.push(format!("{kind} device {name}: {at}"));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(parse_cpu_list("0-3,8").expect("list"), vec![0, 1, 2, 3, 8]);
        assert_eq!(parse_cpu_list("8, 1,1").expect("list"), vec![1, 8]);
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8]), "0-3,8");
        assert_eq!(cpu_list(&[5]), "5");
        for bad in ["", "a", "3-1", "1-", "99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_is_found_and_not_placed() {
        assert_eq!(
            interface_of(IpAddr::from([127, 0, 0, 1])).as_deref(),
            Some("lo")
        );
        let p = for_connection(&[], Some(IpAddr::from([127, 0, 0, 1])));
        assert!(p.cpus.is_empty(), "{p:?}");
        assert!(p.why.contains("lo"), "{p:?}");
        let named = for_connection(&[1], Some(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(named.cpus, vec![1]);
    }

    #[test]
    fn the_topology_has_a_numa_node_with_cpus() {
        let lines = describe().expect("topology");
        assert!(
            lines.iter().any(|l| l.starts_with("NUMA node 0: CPUs 0")),
            "{lines:?}"
        );
    }
}
