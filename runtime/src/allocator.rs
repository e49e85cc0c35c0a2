//! The allocator's settings: the binaries' global allocator is mimalloc, and this is the one
//! module that calls into it (the crate's only `unsafe` code).
#![allow(unsafe_code)]

/// mimalloc's option `purge_delay` (its place in the options of the mimalloc the lock builds, v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long memory freed stays with the allocator before it goes back to the system, at most.
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Makes the allocator (mimalloc, the binaries' global allocator) give freed memory back to the
/// system within 10 ms instead of mimalloc v3's 1 s. A burst that allocates and frees (a flood of
/// peers, a bulk transfer's buffers) otherwise leaves up to a second's worth of freed memory
/// resident: a relay flooded by 64 certificate-less TCP peers peaked 16-24 MiB above idle, 8-11 MiB
/// with 10 ms. An operator's own `MIMALLOC_PURGE_DELAY` wins. Call it first in `main`, beside
/// [`small_pages`](crate::cli::small_pages).
///
/// The relay calls it: it runs under a pod's memory limit and takes unauthenticated peers. The
/// agent does not: with both at 10 ms, bulk transfers measured 9-16 % slower (release, NAT ground,
/// 3 interleaved pairs), with the relay alone within the rounds' noise (0.94-1.11).
pub fn return_freed_memory_soon() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set writes one option of the allocator's table; any value is valid
        // for purge_delay, and the allocator reads it afresh at each purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_set_is_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one option.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(before, 1000, "mimalloc v3's purge_delay default: the option's place changed");
        return_freed_memory_soon();
        // SAFETY: reads one option.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, PURGE_DELAY_MS);
    }
}
