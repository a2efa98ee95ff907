//! `hashq-faultfs`: a FUSE file system that simulates a machine's page cache and power cuts,
//! to test that a database really fsyncs. Data directories of real processes live on it.
//!
//! # The model
//!
//! * Every file has a **durable** content (what survives a cut; stored in
//!   `BACKING/data/<ino>`) and a **current** content (what processes see): the durable bytes
//!   overlaid with in-memory dirty extents and a current size. `write`, `truncate` and
//!   `fallocate` change only the current content. `fsync`/`fdatasync` (either) makes the
//!   file's current content and size durable — and nothing else: not its directory entry.
//! * Every directory has a durable and a current entry map (name → inode). create, mknod,
//!   mkdir, symlink, link, unlink, rmdir and rename change only the current map; `fsync` of
//!   the directory (FUSE `fsyncdir`) makes its current map durable. A rename across
//!   directories becomes durable separately in each directory. A new directory's own entries
//!   and its entry in its parent are separate, as on a real journaling FS with no ordering
//!   guarantees.
//! * The FS starts empty with a durable root. Metadata (entry maps, sizes) lives in memory
//!   only; the FS process itself is not expected to crash.
//! * **cut PREFIX** (power cut; empty or `/` = everything): every file and directory
//!   reachable from PREFIX through current *or* durable entries goes back to its durable
//!   state; inodes then unreachable from the root (through current or durable entries of any
//!   directory) and not held open are deleted with their backing data. The cut subtree is
//!   then **dead**: every operation on it fails with EIO until `revive`. Handles open on it
//!   stay invalid (EIO) for good. Outside the subtree nothing changes.
//! * **Triggers** (`arm cut|cut-after <op> <PATHPREFIX> [SCOPE]`): one-shot; the next
//!   operation of that kind whose path (either path for rename and link) starts with
//!   PATHPREFIX (plain string prefix on the path relative to the root, no leading `/`) cuts
//!   SCOPE instead of running (returns EIO, no effect), or right after running (returns its
//!   own result). When a trigger and a `fail` injection both match, the trigger wins.
//!   Triggers and injections only see operations that passed validation
//!   (e.g. a rename of a missing file fails with ENOENT without consuming anything). If SCOPE
//!   no longer exists when the trigger fires, the whole FS is cut.
//! * **torn PATH**: at the next cut affecting PATH, the first `len / 2` bytes (integer
//!   division) of the last unsynced FUSE write to it become durable, the rest not; the file
//!   grows only to the end of that half. Earlier unsynced writes are dropped as usual.
//! * **flip PATH OFFSET [BIT]**: flips one bit now, in the durable and the current content.
//! * **fail <op> <PATHPREFIX> <errno> [COUNT]**: the next COUNT (default: until `clear`)
//!   matching operations fail with ENOSPC, EIO or EDQUOT and have no effect. A failed fsync
//!   syncs nothing and drops nothing: the dirty data stays dirty and a later successful
//!   fsync makes it durable (unlike Linux ext4/xfs, which may drop dirty pages and clear the
//!   error, so a real retry can "succeed" without the data; we model the forgiving case).
//! * **space BYTES**: from now on statfs reports BYTES free (total = current use + BYTES,
//!   use = sum of the current sizes of linked or open files); a FUSE write, fallocate or
//!   size-extending truncate that would go beyond that fails whole with ENOSPC (the kernel
//!   splits a large `write(2)` into requests, so that call may come back short first).
//!
//! # Kernel caching
//! Every open uses `FOPEN_DIRECT_IO`, entry and attribute timeouts are zero and writeback
//! caching is off, so reads always come from the model.
//!
//! # Limits
//! * The kernel may split one large `write(2)` into several FUSE writes (at most 128 KiB
//!   or 1 MiB each); "last write" for `torn` means the last of those.
//! * With direct I/O, shared writable `mmap` is not available on the mount.
//! * File attributes other than size (mode, owner, times) are kept in memory and are not
//!   part of the durability model; xattrs, devices, fifos and sockets are not supported.
//!   Locks (`flock`, `fcntl`) are left to the kernel (local to this machine).
//! * Control paths may not contain whitespace.
//! * A hard-linked file reachable from a cut subtree is reset and dead under all its names.

pub mod control;
pub mod extents;
pub mod fs;
pub mod harness;
pub mod model;
#[cfg(test)]
mod model_tests;

pub use control::Control;
pub use harness::Mounted;
pub use model::{Fired, Op, Stats};
