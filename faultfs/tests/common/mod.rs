//! Shared helpers of the integration tests: mount the real binary, sync directories, check
//! errnos.

#![allow(dead_code)]

use std::ffi::CString;
use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use hashq_faultfs::Mounted;

/// Mounts a fresh hashq-faultfs; fails loudly (never skips) when FUSE is unusable.
pub fn mount() -> Mounted {
    Mounted::spawn(env!("CARGO_BIN_EXE_hashq-faultfs")).unwrap_or_else(|e| {
        panic!(
            "cannot mount hashq-faultfs: {e}\n\
             These tests need /dev/fuse and root (or fusermount3 from Debian's fuse3 package)."
        )
    })
}

/// `fsync` of a directory (FUSE fsyncdir).
pub fn sync_dir(p: impl AsRef<Path>) {
    File::open(p.as_ref())
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync dir {}: {e}", p.as_ref().display()));
}

/// Asserts that `r` failed with `errno`.
#[track_caller]
pub fn assert_errno<T: Debug>(r: io::Result<T>, errno: i32) {
    match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(errno), "wrong error: {e}"),
        Ok(v) => panic!("expected errno {errno}, got Ok({v:?})"),
    }
}

/// Asserts that `r` failed with EIO.
#[track_caller]
pub fn assert_eio<T: Debug>(r: io::Result<T>) {
    assert_errno(r, libc::EIO);
}

/// Power cut of `prefix`, then revive it.
pub fn crash(fs: &mut Mounted, prefix: &str) {
    fs.control().cut(prefix).expect("cut");
    fs.control().revive(prefix).expect("revive");
}

/// `statvfs(2)`.
pub fn statvfs(p: &Path) -> libc::statvfs {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string and out-buffer.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(
            libc::statvfs(c.as_ptr(), &mut s),
            0,
            "statvfs {}",
            p.display()
        );
        s
    }
}

/// Sorted names in a directory.
pub fn names(p: impl AsRef<Path>) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .expect("read_dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// xorshift64: deterministic, seedable, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
