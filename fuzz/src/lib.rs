//! Helpers shared by Ferry's fuzz targets (`fuzz_targets/*.rs`).
//!
//! # Why every target starts with `use ferry_fuzz as _;`
//!
//! libFuzzer enforces `-malloc_limit_mb` (one allocation larger than the limit is an
//! "out-of-memory (malloc(N))" crash with an `oom-` artifact) only through the sanitizer
//! hook `__sanitizer_install_malloc_and_free_hooks`, which the ASan/MSan runtime provides.
//! On the stable toolchain there is no sanitizer runtime (`-Zsanitizer` is nightly-only),
//! so the flag would silently do nothing, and a `vec![0; huge]` (calloc: untouched pages
//! never count towards `-rss_limit_mb`) would go unnoticed.
//!
//! This crate supplies that hook and a global allocator that reports every Rust
//! allocation to it, so libFuzzer's own check runs as it does under ASan. Naming the
//! crate (`use ferry_fuzz as _;`) is what links it, and with it the allocator, into a
//! target.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

type MallocHook = unsafe extern "C" fn(*const c_void, usize);
type FreeHook = unsafe extern "C" fn(*const c_void);

/// libFuzzer's malloc hook, as a `usize` (0 until libFuzzer installs it).
static MALLOC_HOOK: AtomicUsize = AtomicUsize::new(0);
/// libFuzzer's free hook, likewise.
static FREE_HOOK: AtomicUsize = AtomicUsize::new(0);

/// The sanitizer interface function libFuzzer calls (through a weak reference) when it
/// starts, to learn of every allocation. Returns 1: hooks installed.
///
/// # Safety
///
/// Called by libFuzzer with function pointers that stay valid for the process's life.
#[no_mangle]
pub unsafe extern "C" fn __sanitizer_install_malloc_and_free_hooks(
    malloc_hook: Option<MallocHook>,
    free_hook: Option<FreeHook>,
) -> c_int {
    MALLOC_HOOK.store(malloc_hook.map_or(0, |f| f as usize), Ordering::Release);
    FREE_HOOK.store(free_hook.map_or(0, |f| f as usize), Ordering::Release);
    1
}

fn on_malloc(ptr: *mut u8, size: usize) {
    let h = MALLOC_HOOK.load(Ordering::Acquire);
    if h != 0 {
        // SAFETY: `h` was stored from a `MallocHook` by the installer above.
        let hook: MallocHook = unsafe { std::mem::transmute::<usize, MallocHook>(h) };
        // SAFETY: libFuzzer's hook only counts, compares `size` with the limit and reads
        // `ptr` as a number (for `-trace_malloc`).
        unsafe { hook(ptr as *const c_void, size) };
    }
}

fn on_free(ptr: *mut u8) {
    let h = FREE_HOOK.load(Ordering::Acquire);
    if h != 0 {
        // SAFETY: `h` was stored from a `FreeHook` by the installer above.
        let hook: FreeHook = unsafe { std::mem::transmute::<usize, FreeHook>(h) };
        // SAFETY: as for the malloc hook: the pointer is only counted or printed.
        unsafe { hook(ptr as *const c_void) };
    }
}

/// The system allocator, reporting each allocation to libFuzzer's hooks. The hook runs
/// after the allocation, and also when it failed (null), so an impossible request is
/// reported as libFuzzer's out-of-memory rather than as Rust's allocation-failure abort.
pub struct HookedAlloc;

// SAFETY: every method forwards to `System` unchanged; the hooks only observe.
unsafe impl GlobalAlloc for HookedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(layout) };
        on_malloc(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        on_malloc(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(ptr);
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            on_free(ptr);
        }
        on_malloc(p, new_size);
        p
    }
}

#[global_allocator]
static ALLOC: HookedAlloc = HookedAlloc;

/// Reads a little-endian `u64` from the first 8 bytes of `data` (missing bytes are 0),
/// and returns it with the rest of the input.
pub fn take_u64(data: &[u8]) -> (u64, &[u8]) {
    let n = data.len().min(8);
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&data[..n]);
    (u64::from_le_bytes(b), &data[n..])
}

/// Little-endian `u64` words of `data` (a trailing partial word is dropped).
pub fn u64_words(data: &[u8]) -> Vec<u64> {
    data.chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect()
}
