//! A userfaultfd for missing pages (`userfaultfd(2)`, `ioctl_userfaultfd(2)`): the five
//! calls post-copy needs (API handshake, register, unregister, copy, wake) and the fault
//! messages.
//!
//! Written here rather than taken from the `userfaultfd` crate: its `-sys` crate generates its
//! bindings with bindgen at build time, so every machine that builds the shim would need
//! libclang (docs/design.md). The layouts below are the kernel's UAPI (`linux/userfaultfd.h`),
//! checked by size in the tests.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
/// Register for missing-page faults.
const MODE_MISSING: u64 = 1;
/// Missing-page faults on shared memory (memfds).
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const EVENT_PAGEFAULT: u8 = 0x12;
/// The host's page size (x86-64).
const PAGE: usize = 4096;

#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg` (packed, 32 bytes): the event, then for a page fault its flags and
/// address.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Msg {
    event: u8,
    reserved: [u8; 7],
    flags: u64,
    address: u64,
    extra: u64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, Api);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, Register);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, Range);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, Range);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);

/// userfaultfd failures (the call and its errno).
#[derive(Debug, Error)]
pub enum UffdError {
    /// A call failed.
    #[error("{call}: {source}")]
    Call {
        /// Which call.
        call: &'static str,
        /// Its error.
        source: std::io::Error,
    },
}

fn check(call: &'static str, ret: i32) -> Result<(), UffdError> {
    if ret < 0 { Err(UffdError::Call { call, source: std::io::Error::last_os_error() }) } else { Ok(()) }
}

/// What a copy did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Copied {
    /// The page is there now (its waiters woken).
    Done,
    /// A page was there already (`EEXIST`).
    AlreadyThere,
    /// The range is no longer registered (its mapping went: `ENOENT`).
    Unmapped,
}

/// A non-blocking userfaultfd that also takes faults raised inside the kernel (KVM's, the
/// shim's own system calls on guest memory).
#[derive(Debug)]
pub(crate) struct Uffd(File);

impl Uffd {
    /// Opens one and agrees on the API (with missing faults on shared memory when `shmem`).
    pub(crate) fn new(shmem: bool) -> Result<Uffd, UffdError> {
        // SAFETY: userfaultfd(2) takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(UffdError::Call { call: "userfaultfd", source: std::io::Error::last_os_error() });
        }
        // SAFETY: `fd` is a descriptor just returned to this process, owned by nobody else.
        let uffd = Uffd(unsafe { File::from_raw_fd(fd as RawFd) });
        let mut api = Api { api: UFFD_API, features: if shmem { FEATURE_MISSING_SHMEM } else { 0 }, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `Api` lays out.
        check("UFFDIO_API", unsafe { ioctl_with_mut_ref(&uffd.0, UFFDIO_API(), &mut api) })?;
        Ok(uffd)
    }

    /// Registers `[start, start + len)` (page-aligned, one or more whole mappings of this
    /// process) for missing-page faults.
    pub(crate) fn register(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut r = Register { range: Range { start: start as u64, len: len as u64 }, mode: MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; the kernel
        // checks the range against this process's mappings.
        check("UFFDIO_REGISTER", unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_REGISTER(), &mut r) })
    }

    /// Unregisters `[start, start + len)`; threads waiting on a fault there are woken (and
    /// fault again as usual).
    pub(crate) fn unregister(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let r = Range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`.
        check("UFFDIO_UNREGISTER", unsafe { ioctl_with_ref(&self.0, UFFDIO_UNREGISTER(), &r) })
    }

    /// Wakes the threads waiting on a fault in `[start, start + len)`.
    pub(crate) fn wake(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let r = Range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`.
        check("UFFDIO_WAKE", unsafe { ioctl_with_ref(&self.0, UFFDIO_WAKE(), &r) })
    }

    /// Copies `data` (one page) to `dst`, a missing page this userfaultfd registered, and
    /// wakes its waiters. The kernel fills only missing pages and checks the range: no page of
    /// this process other than registered, missing ones can change. (One page at a time: a
    /// range stops at its first page already there, and the rest would need copying again.)
    pub(crate) fn copy_page(&self, data: &[u8], dst: usize) -> Result<Copied, UffdError> {
        if data.len() != PAGE || !dst.is_multiple_of(PAGE) {
            let source = std::io::Error::from(std::io::ErrorKind::InvalidInput);
            return Err(UffdError::Call { call: "UFFDIO_COPY (one whole page)", source });
        }
        loop {
            let mut c =
                UffdioCopy { dst: dst as u64, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
            // SAFETY: UFFDIO_COPY reads `data` (a live buffer of `len` bytes) and writes only
            // pages of registered ranges that are missing; it reads and writes a `struct
            // uffdio_copy`.
            let ret = unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_COPY(), &mut c) };
            if ret >= 0 {
                return Ok(Copied::Done);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The mappings changed meanwhile: again (one page: nothing was copied).
                Some(libc::EAGAIN) => continue,
                Some(libc::EEXIST) => return Ok(Copied::AlreadyThere),
                Some(libc::ENOENT) => return Ok(Copied::Unmapped),
                _ => return Err(UffdError::Call { call: "UFFDIO_COPY", source: e }),
            }
        }
    }

    /// The (page-aligned) addresses of the page faults waiting, at most `max`; none when
    /// nothing waits.
    pub(crate) fn faults(&self, max: usize) -> Result<Vec<usize>, UffdError> {
        let mut msgs = vec![Msg::default(); max.max(1)];
        let size = std::mem::size_of::<Msg>();
        // SAFETY: `Msg` is plain old data (any bytes are valid); the slice covers exactly the
        // vector's initialized elements.
        let bytes = unsafe { std::slice::from_raw_parts_mut(msgs.as_mut_ptr().cast::<u8>(), msgs.len() * size) };
        let n = match (&self.0).read(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(source) => return Err(UffdError::Call { call: "read", source }),
        };
        let page = !(PAGE - 1);
        Ok(msgs[..n / size].iter().filter(|m| m.event == EVENT_PAGEFAULT).map(|m| m.address as usize & page).collect())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_the_kernels() {
        assert_eq!(std::mem::size_of::<Api>(), 24);
        assert_eq!(std::mem::size_of::<Register>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<Msg>(), 32);
        // _IOWR(0xAA, 0x3F, 24) and _IOWR(0xAA, 0x03, 40), as <linux/userfaultfd.h> gives them.
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_aa01);
    }

    #[test]
    fn a_missing_page_waits_for_its_copy_and_reads_it() {
        let Ok(uffd) = Uffd::new(false) else {
            eprintln!("skipped: no userfaultfd here");
            return;
        };
        let page = 4096usize;
        // SAFETY: a fresh private anonymous mapping of two pages, unmapped at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
        uffd.register(base, 2 * page).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: the mapping lives until the test unmaps it after this thread ends.
            unsafe { std::ptr::read_volatile((base + page + 8) as *const u64) }
        });
        let mut faults = Vec::new();
        while faults.is_empty() {
            let mut fds = [libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
            faults = uffd.faults(8).unwrap();
        }
        assert_eq!(faults, vec![base + page]);
        let mut data = vec![0u8; page];
        data[8..16].copy_from_slice(&0x1234_5678u64.to_le_bytes());
        assert!(uffd.copy_page(&data[..100], base + page).is_err(), "one whole page only");
        assert_eq!(uffd.copy_page(&data, base + page).unwrap(), Copied::Done);
        assert_eq!(reader.join().unwrap(), 0x1234_5678);
        // A second copy does not overwrite it.
        assert_eq!(uffd.copy_page(&[0u8; 4096], base + page).unwrap(), Copied::AlreadyThere);
        uffd.unregister(base, 2 * page).unwrap();
        // SAFETY: the mapping made above; no thread uses it any more.
        unsafe { libc::munmap(base as *mut libc::c_void, 2 * page) };
    }
}
