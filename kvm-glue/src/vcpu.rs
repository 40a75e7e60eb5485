//! Pausing and resuming vCPUs that each run in their own thread.
//!
//! A VMM creates one [`VcpuControl`] for its vCPUs and, in each vCPU thread, attaches that
//! thread's `VcpuFd` with [`VcpuControl::attach`]. The thread then loops:
//!
//! ```text
//! while thread.checkpoint() == RunState::Run {     // parks here while paused
//!     match thread.run()? {                       // KVM_RUN
//!         None => continue,                       // interrupted by a pause: re-check
//!         Some(exit) => handle(exit),
//!     }
//! }
//! ```
//!
//! [`VcpuControl::pause`] makes every vCPU leave `KVM_RUN` promptly: it sets
//! `kvm_run.immediate_exit = 1` (so a thread about to enter `KVM_RUN` returns at once) and
//! sends [`pause_signal`] to the thread (so one already inside returns with `EINTR`; the
//! handler does nothing). It then waits until every attached vCPU is parked in
//! `checkpoint` and reports how long that took. docs/platform.md measured p50 38 us, p99 87 us for
//! a native guest. While paused, [`VcpuControl::with_vcpus`] lends the parked `VcpuFd`s to
//! the caller (to save state: KVM vCPU ioctls may come from any thread of the VMM process,
//! but not from another process: EIO).
//!
//! # Threads
//!
//! [`VcpuThread`] is neither `Send` nor `Sync`: it is created and dropped in its vCPU
//! thread, which is what makes signalling that thread sound. A thread that sleeps between
//! runs (e.g. to pace a guest) must use [`VcpuThread::pace`], which returns early when a
//! pause or stop is requested; a plain `sleep` would delay the pause by the sleep.
//!
//! # Signals
//!
//! The pause signal is `SIGRTMIN + PAUSE_SIGNAL_OFFSET`; its handler is installed once per
//! process (without `SA_RESTART`) and the signal is unblocked in each attached thread.
//! Nothing else in the process may use that signal.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::{Error, Result};

/// Offset of the pause signal above `SIGRTMIN` (Firecracker uses the same scheme).
pub const PAUSE_SIGNAL_OFFSET: i32 = 0;

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn pause_signal() -> i32 {
    libc::SIGRTMIN() + PAUSE_SIGNAL_OFFSET
}

extern "C" fn noop_handler(_: libc::c_int) {}

fn install_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    let sig = pause_signal();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
        // an `extern "C"` function that does nothing (async-signal-safe); `sigaction` only
        // reads `act` and we pass no `oldact`.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = noop_handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
            act.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EINVAL));
            }
        }
        Ok(())
    });
    r.map_err(|errno| Error::SignalHandler {
        signal: sig,
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// What the VMM asked the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// What a vCPU thread should do after a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Enter (or re-enter) `KVM_RUN`.
    Run,
    /// Leave the run loop; the VMM is stopping the vCPUs.
    Stop,
}

/// Pointers a vCPU thread publishes while attached.
#[derive(Debug, Clone, Copy)]
struct Attached {
    tid: libc::pthread_t,
    /// `&kvm_run.immediate_exit` of the attached vCPU.
    immediate_exit: *const AtomicU8,
    /// The attached vCPU, valid while `parked` (the thread is blocked in `checkpoint`).
    vcpu: *const VcpuFd,
}

#[derive(Debug, Default)]
struct Slot {
    attached: Option<Attached>,
    parked: bool,
    parked_at: Option<Instant>,
}

#[derive(Debug)]
struct CtlState {
    request: Request,
    slots: Vec<Slot>,
}

// SAFETY: the raw pointers in `Attached` are only dereferenced under the mutex that owns
// this state, while the attaching thread guarantees their targets live: `immediate_exit`
// and `vcpu` point into the `VcpuFd` that `VcpuThread` borrows mutably for its whole life,
// and `VcpuThread::drop` clears them (under the mutex) before that borrow ends.
unsafe impl Send for CtlState {}

#[derive(Debug)]
struct Shared {
    state: Mutex<CtlState>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, CtlState> {
        // The state is a few flags; a panic elsewhere leaves it consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How long a pause took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseReport {
    /// From the pause request to the last vCPU parked.
    pub elapsed: Duration,
    /// Per vCPU index: from the request until it parked (`None`: not attached).
    pub per_vcpu: Vec<Option<Duration>>,
}

/// Pauses, resumes and stops a set of vCPU threads. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct VcpuControl {
    shared: Arc<Shared>,
}

impl VcpuControl {
    /// Creates the control for `vcpus` vCPUs (indices `0..vcpus`) and installs the pause
    /// signal handler (once per process).
    ///
    /// # Errors
    ///
    /// [`Error::SignalHandler`].
    pub fn new(vcpus: usize) -> Result<Self> {
        install_handler()?;
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(CtlState {
                    request: Request::Run,
                    slots: (0..vcpus).map(|_| Slot::default()).collect(),
                }),
                cv: Condvar::new(),
            }),
        })
    }

    /// Number of vCPU indices.
    pub fn len(&self) -> usize {
        self.shared.lock().slots.len()
    }

    /// Whether the control has no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Attaches the calling thread as vCPU `index` running `vcpu`. Call it in the vCPU
    /// thread; the returned value must stay in that thread (it is `!Send`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSlot`] for an index out of range or already attached;
    /// [`Error::SignalHandler`] if the pause signal cannot be unblocked.
    pub fn attach<'v>(&self, index: usize, vcpu: &'v mut VcpuFd) -> Result<VcpuThread<'v>> {
        let sig = pause_signal();
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use;
        // pthread_sigmask only changes the calling thread's mask.
        let rc = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(Error::SignalHandler {
                signal: sig,
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        let run = vcpu.get_kvm_run();
        let ie: *mut u8 = std::ptr::addr_of_mut!(run.immediate_exit);
        let immediate_exit = ie.cast::<AtomicU8>().cast_const();
        let vcpu_ptr: *const VcpuFd = vcpu;
        let mut st = self.shared.lock();
        let slot = st.slots.get_mut(index).ok_or(Error::InvalidSlot {
            slot: u32::try_from(index).unwrap_or(u32::MAX),
            reason: "vCPU index out of range",
        })?;
        if slot.attached.is_some() {
            return Err(Error::InvalidSlot {
                slot: u32::try_from(index).unwrap_or(u32::MAX),
                reason: "vCPU index already attached",
            });
        }
        slot.attached = Some(Attached {
            // SAFETY: pthread_self has no preconditions.
            tid: unsafe { libc::pthread_self() },
            immediate_exit,
            vcpu: vcpu_ptr,
        });
        slot.parked = false;
        drop(st);
        Ok(VcpuThread {
            shared: Arc::clone(&self.shared),
            index,
            vcpu,
            _not_send: PhantomData,
        })
    }

    /// Asks every vCPU to park, kicks them out of `KVM_RUN`, and waits (up to `timeout`)
    /// until every attached vCPU is parked.
    ///
    /// # Errors
    ///
    /// [`Error::SignalVcpu`], [`Error::PauseTimeout`] (the pause request stays in force;
    /// call [`resume`](Self::resume) to cancel it).
    pub fn pause(&self, timeout: Duration) -> Result<PauseReport> {
        let start = Instant::now();
        let mut st = self.shared.lock();
        if st.request == Request::Pause && all_parked(&st) {
            return Ok(report(&st, start));
        }
        st.request = Request::Pause;
        for s in &mut st.slots {
            s.parked_at = None;
        }
        kick_all(&st)?;
        // Wake threads sleeping in `pace` (a signal does not end a condvar wait).
        self.shared.cv.notify_all();
        let deadline = start + timeout;
        while !all_parked(&st) {
            let now = Instant::now();
            if now >= deadline {
                let expected = st.slots.iter().filter(|s| s.attached.is_some()).count();
                let parked = st
                    .slots
                    .iter()
                    .filter(|s| s.attached.is_some() && s.parked)
                    .count();
                return Err(Error::PauseTimeout {
                    parked,
                    expected,
                    waited_us: u64::try_from(now.duration_since(start).as_micros())
                        .unwrap_or(u64::MAX),
                });
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        Ok(report(&st, start))
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) {
        let mut st = self.shared.lock();
        if st.request == Request::Pause {
            st.request = Request::Run;
        }
        drop(st);
        self.shared.cv.notify_all();
    }

    /// Whether a pause is in force and every attached vCPU is parked.
    pub fn is_paused(&self) -> bool {
        let st = self.shared.lock();
        st.request == Request::Pause && all_parked(&st)
    }

    /// Asks every vCPU thread to leave its run loop (`checkpoint` returns
    /// [`RunState::Stop`]), kicks them, and waits up to `timeout` for them to detach.
    ///
    /// # Errors
    ///
    /// [`Error::SignalVcpu`], [`Error::PauseTimeout`] (counting detached vCPUs as parked).
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut st = self.shared.lock();
        st.request = Request::Stop;
        kick_all(&st)?;
        self.shared.cv.notify_all();
        let deadline = start + timeout;
        loop {
            let attached = st.slots.iter().filter(|s| s.attached.is_some()).count();
            if attached == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::PauseTimeout {
                    parked: st.slots.len() - attached,
                    expected: st.slots.len(),
                    waited_us: u64::try_from(now.duration_since(start).as_micros())
                        .unwrap_or(u64::MAX),
                });
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Runs `f` with the parked vCPUs, in index order (for state save/restore). The vCPUs
    /// cannot resume while `f` runs.
    ///
    /// # Errors
    ///
    /// [`Error::NotPaused`] unless a pause is in force and every vCPU index is attached and
    /// parked.
    pub fn with_vcpus<R>(&self, f: impl FnOnce(&[&VcpuFd]) -> R) -> Result<R> {
        let st = self.shared.lock();
        if st.request != Request::Pause {
            return Err(Error::NotPaused);
        }
        let mut vcpus: Vec<&VcpuFd> = Vec::with_capacity(st.slots.len());
        for s in &st.slots {
            match (s.attached, s.parked) {
                // SAFETY: the thread that attached this vCPU is blocked in `checkpoint` (it
                // is parked, and cannot leave before `request` changes, which needs the
                // mutex we hold until `f` returns), so it makes no use of its `&mut VcpuFd`;
                // the pointer came from that borrow, which outlives the attachment. VcpuFd
                // is Sync, and its get/set ioctls take `&self`.
                (Some(a), true) => vcpus.push(unsafe { &*a.vcpu }),
                _ => return Err(Error::NotPaused),
            }
        }
        let r = f(&vcpus);
        drop(vcpus);
        drop(st);
        Ok(r)
    }
}

fn all_parked(st: &CtlState) -> bool {
    st.slots.iter().all(|s| s.attached.is_none() || s.parked)
}

fn report(st: &CtlState, start: Instant) -> PauseReport {
    let per_vcpu: Vec<Option<Duration>> = st
        .slots
        .iter()
        .map(|s| s.parked_at.map(|t| t.saturating_duration_since(start)))
        .collect();
    let elapsed = per_vcpu.iter().flatten().max().copied().unwrap_or_default();
    PauseReport { elapsed, per_vcpu }
}

/// Sets `immediate_exit` and signals every attached, unparked vCPU thread. Called with the
/// state locked, so no thread can detach (and exit) while it is signalled.
fn kick_all(st: &CtlState) -> Result<()> {
    let sig = pause_signal();
    for (i, s) in st.slots.iter().enumerate() {
        let Some(a) = s.attached else { continue };
        if s.parked {
            continue;
        }
        // SAFETY: see `CtlState`'s Send impl: the VcpuFd holding this kvm_run mapping is
        // borrowed by the attached thread, which cannot detach while we hold the lock.
        // The kernel only reads the byte, and every other access is atomic too.
        unsafe { &*a.immediate_exit }.store(1, Ordering::SeqCst);
        // SAFETY: `a.tid` is a live thread: it is attached, and detaching (in the thread,
        // before it exits) takes the lock we hold.
        let rc = unsafe { libc::pthread_kill(a.tid, sig) };
        if rc != 0 {
            return Err(Error::SignalVcpu {
                vcpu: i,
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
    }
    Ok(())
}

/// One vCPU thread's side of [`VcpuControl`]; detaches on drop.
#[derive(Debug)]
pub struct VcpuThread<'v> {
    shared: Arc<Shared>,
    index: usize,
    vcpu: &'v mut VcpuFd,
    /// `!Send + !Sync`: created and dropped in the attached thread (its tid is signalled).
    _not_send: PhantomData<*const ()>,
}

impl VcpuThread<'_> {
    /// The vCPU index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The attached vCPU (for register access between runs).
    pub fn vcpu(&self) -> &VcpuFd {
        self.vcpu
    }

    fn immediate_exit(&mut self) -> &AtomicU8 {
        let run = self.vcpu.get_kvm_run();
        let ie: *mut u8 = std::ptr::addr_of_mut!(run.immediate_exit);
        // SAFETY: `ie` points into the live kvm_run mapping of our borrowed VcpuFd, is
        // aligned (u8), and every access from user space goes through AtomicU8.
        unsafe { &*ie.cast::<AtomicU8>() }
    }

    /// Parks while a pause is requested; returns whether to run or leave the loop. Call it
    /// before every `run`.
    pub fn checkpoint(&mut self) -> RunState {
        let shared = Arc::clone(&self.shared);
        let mut st = shared.lock();
        loop {
            match st.request {
                Request::Run => {
                    // Under the lock: a pause request made after this point stores
                    // immediate_exit = 1 after our store, so it is never lost.
                    self.immediate_exit().store(0, Ordering::SeqCst);
                    return RunState::Run;
                }
                Request::Stop => return RunState::Stop,
                Request::Pause => {
                    let slot = &mut st.slots[self.index];
                    if !slot.parked {
                        slot.parked = true;
                        slot.parked_at = Some(Instant::now());
                        shared.cv.notify_all();
                    }
                    st = shared
                        .cv
                        .wait(st)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if st.request != Request::Pause {
                        st.slots[self.index].parked = false;
                    }
                }
            }
        }
    }

    /// `KVM_RUN`. `Ok(None)` means the run was interrupted (pause signal, `immediate_exit`
    /// or any other signal): call [`checkpoint`](Self::checkpoint) and run again.
    ///
    /// # Errors
    ///
    /// The kernel's error from `KVM_RUN`, other than `EINTR`/`EAGAIN`.
    pub fn run(&mut self) -> std::result::Result<Option<VcpuExit<'_>>, kvm_ioctls::Error> {
        match self.vcpu.run() {
            Ok(exit) => Ok(Some(exit)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sleeps up to `d`, returning early when a pause or stop is requested. Use it instead
    /// of `std::thread::sleep` to pace a guest between runs.
    pub fn pace(&self, d: Duration) -> RunState {
        let deadline = Instant::now() + d;
        let mut st = self.shared.lock();
        loop {
            match st.request {
                Request::Stop => return RunState::Stop,
                Request::Pause => return RunState::Run,
                Request::Run => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return RunState::Run;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl Drop for VcpuThread<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(s) = st.slots.get_mut(self.index) {
            s.attached = None;
            s.parked = false;
        }
        drop(st);
        self.shared.cv.notify_all();
    }
}
