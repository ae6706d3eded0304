//! What `std` would provide on wasm, without importing anything from the host.

/// `memory.grow` is all dlmalloc needs on wasm32: no imports.
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// A panic traps; the host reports the trap against the policy and keeps the last
/// good weights. (Printing the message would need a WASI import.)
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

/// The component model's allocation hook: the host calls it to place arguments
/// in guest memory. On wasm32-wasip2 `std` would export it; a `no_std` guest must.
///
/// # Safety
/// Called by the canonical ABI with a pointer/size pair it got from this function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(old_ptr: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
    use alloc::alloc::{alloc, realloc, Layout};
    if new_len == 0 {
        return align as *mut u8;
    }
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(old_ptr, Layout::from_size_align_unchecked(old_len, align), new_len)
        }
    };
    if ptr.is_null() {
        // Out of memory (the host's limit): trap rather than return null.
        core::arch::wasm32::unreachable();
    }
    ptr
}

// memcpy, memcmp and friends come from wasi-libc's static libc.a (in the
// target's self-contained directory). Only those pure functions are pulled in;
// nothing in them imports from the host.
#[link(name = "c")]
unsafe extern "C" {}
