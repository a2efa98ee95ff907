//! Handles and contents: open and release, reads and writes over the backing files,
//! `fallocate`, `fsync` of files and directories, directory listings.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::{io_errno, Content, DirEntry, Handle, Ino, Inode, Kind, Model, Op, Res, ROOT};

impl Model {
    // ----- file data ----------------------------------------------------------------------

    /// Opens a file (honours `O_TRUNC` and `O_APPEND`); returns a handle.
    pub fn open(&mut self, ino: Ino, flags: i32) -> Res<u64> {
        let kind = self.node(ino)?.kind();
        if kind == Kind::Dir && flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(libc::EISDIR);
        }
        if flags & libc::O_TRUNC != 0 && kind == Kind::File && flags & libc::O_ACCMODE != 0 {
            self.truncate(ino, 0)?;
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle {
                ino,
                valid: true,
                append: flags & libc::O_APPEND != 0,
                listing: Vec::new(),
            },
        );
        self.node_mut(ino)?.open += 1;
        Ok(fh)
    }

    /// Closes a handle (always succeeds; a handle killed by a cut just goes away).
    pub fn release(&mut self, fh: u64) {
        let Some(h) = self.handles.remove(&fh) else {
            return;
        };
        if h.valid {
            if let Some(n) = self.inodes.get_mut(&h.ino) {
                n.open = n.open.saturating_sub(1);
            }
            self.collect_if_orphan(h.ino);
        }
    }

    /// `flush` (close): fails only on a dead handle.
    pub fn flush(&self, fh: u64) -> Res<()> {
        let h = self.handle(fh)?;
        self.node(h.ino).map(|_| ())
    }

    pub(super) fn backing_path(&self, ino: Ino) -> PathBuf {
        self.data_dir.join(ino.to_string())
    }

    /// The backing file of `ino`, opened (and created) on first use and kept open.
    pub(super) fn backing(&mut self, ino: Ino) -> Res<&File> {
        let path = self.backing_path(ino);
        // Deliberately ignores death: cuts, torn writes and flips work on dead inodes.
        let f = self.file_mut_any(ino)?;
        if f.backing.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io_errno)?;
            f.backing = Some(file);
        }
        f.backing.as_ref().ok_or(libc::EIO)
    }

    /// Reads current content: backing bytes below `base_len`, zeros above, dirty on top.
    fn read_current(&mut self, ino: Ino, off: u64, size: u64) -> Res<Vec<u8>> {
        let (cur_len, base_len) = match &self.node(ino)?.content {
            Content::File(f) => (f.cur_len, f.base_len),
            Content::Dir(_) => return Err(libc::EISDIR),
            Content::Symlink(_) => return Err(libc::EINVAL),
        };
        if off >= cur_len {
            return Ok(Vec::new());
        }
        let n = size.min(cur_len - off);
        let mut buf = vec![0u8; n as usize];
        let base_end = (off + n).min(base_len);
        if off < base_end {
            let part = &mut buf[..(base_end - off) as usize];
            self.backing(ino)?
                .read_exact_at(part, off)
                .map_err(io_errno)?;
        }
        if let Content::File(f) = &self.node(ino)?.content {
            f.dirty.overlay(off, &mut buf);
        }
        Ok(buf)
    }

    /// `read` through a handle.
    pub fn read(&mut self, fh: u64, off: u64, size: u32) -> Res<Vec<u8>> {
        let ino = self.handle(fh)?.ino;
        self.read_current(ino, off, u64::from(size))
    }

    /// Reads the current content of `ino` (all of it); used by tests and `flip`.
    pub fn read_all(&mut self, ino: Ino) -> Res<Vec<u8>> {
        self.read_current(ino, 0, u64::MAX)
    }

    /// Reads the durable content of `ino` (what a full cut would leave).
    pub fn read_durable(&mut self, ino: Ino) -> Res<Vec<u8>> {
        let len = match &self.inodes.get(&ino).ok_or(libc::ENOENT)?.content {
            Content::File(f) => f.durable_len,
            _ => return Err(libc::EISDIR),
        };
        let mut buf = vec![0u8; len as usize];
        if len > 0 {
            self.backing(ino)?
                .read_exact_at(&mut buf, 0)
                .map_err(io_errno)?;
        }
        Ok(buf)
    }

    /// `write` through a handle (at the end of the file for `O_APPEND` handles).
    pub fn write(&mut self, fh: u64, off: u64, data: &[u8]) -> Res<u32> {
        let h = self.handle(fh)?;
        let (ino, append) = (h.ino, h.append);
        self.write_ino(ino, off, data, append)
    }

    fn write_ino(&mut self, ino: Ino, off: u64, data: &[u8], append: bool) -> Res<u32> {
        let cur_len = match &self.node(ino)?.content {
            Content::File(f) => f.cur_len,
            Content::Dir(_) => return Err(libc::EISDIR),
            Content::Symlink(_) => return Err(libc::EINVAL),
        };
        let after = self.before(Op::Write, |m| m.paths_of(ino))?;
        let off = if append { cur_len } else { off };
        let end = off + data.len() as u64;
        let r = self.check_space(cur_len, end).and_then(|()| {
            let f = self.file_mut(ino)?;
            f.dirty.write(off, data);
            f.cur_len = f.cur_len.max(end);
            f.last_write = Some((off, data.to_vec()));
            self.node_mut(ino)?.meta.touch();
            Ok(data.len() as u32)
        });
        self.after(after, r)
    }

    /// `fallocate`: mode 0 extends the size to `off + len`; other modes are EOPNOTSUPP.
    pub fn fallocate(&mut self, fh: u64, off: u64, len: u64, mode: i32) -> Res<()> {
        let ino = self.handle(fh)?.ino;
        if mode != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        let cur_len = match &self.node(ino)?.content {
            Content::File(f) => f.cur_len,
            _ => return Err(libc::ENODEV),
        };
        let after = self.before(Op::Fallocate, |m| m.paths_of(ino))?;
        let end = off.saturating_add(len);
        let r = self.check_space(cur_len, end).and_then(|()| {
            let f = self.file_mut(ino)?;
            f.cur_len = f.cur_len.max(end);
            Ok(())
        });
        self.after(after, r)
    }

    /// `fsync`/`fdatasync`: makes the file's current content and size durable.
    pub fn fsync(&mut self, fh: u64) -> Res<()> {
        let ino = self.handle(fh)?.ino;
        self.fsync_ino(ino)
    }

    /// [`Model::fsync`] by inode (tests, and `fsync` without a handle).
    pub fn fsync_ino(&mut self, ino: Ino) -> Res<()> {
        let kind = self.node(ino)?.kind();
        let after = self.before(Op::Fsync, |m| m.paths_of(ino))?;
        let r = match kind {
            Kind::File => self.sync_file(ino),
            _ => Ok(()),
        };
        self.after(after, r)
    }

    fn sync_file(&mut self, ino: Ino) -> Res<()> {
        let clean = match &self.node(ino)?.content {
            Content::File(f) => f.is_clean(),
            _ => return Ok(()),
        };
        if !clean {
            let file = self.backing(ino)?.try_clone().map_err(io_errno)?;
            let f = self.file_mut(ino)?;
            // Bytes cut off by a truncate must come back as zeros, hence two set_len calls.
            file.set_len(f.base_len).map_err(io_errno)?;
            file.set_len(f.cur_len).map_err(io_errno)?;
            for (off, bytes) in f.dirty.iter() {
                file.write_all_at(bytes, off).map_err(io_errno)?;
            }
            f.durable_len = f.cur_len;
            f.base_len = f.cur_len;
            f.dirty.clear();
        }
        self.file_mut(ino)?.last_write = None;
        Ok(())
    }

    // ----- directories --------------------------------------------------------------------

    /// Opens a directory.
    pub fn opendir(&mut self, ino: Ino) -> Res<u64> {
        self.dir(ino)?;
        self.open(ino, libc::O_RDONLY)
    }

    /// Entries from `offset` on (`.` and `..` first); re-lists when `offset` is 0.
    pub fn readdir(&mut self, fh: u64, offset: u64) -> Res<Vec<DirEntry>> {
        let ino = self.handle(fh)?.ino;
        let d = self.dir(ino)?;
        if offset == 0 {
            let parent = self
                .inodes
                .get(&ino)
                .and_then(|n| n.links.iter().next().map(|(p, _)| *p))
                .unwrap_or(ROOT);
            let mut listing = vec![
                (ino, Kind::Dir, OsString::from(".")),
                (parent, Kind::Dir, OsString::from("..")),
            ];
            for (name, c) in &d.cur {
                let kind = self.inodes.get(c).map(Inode::kind).unwrap_or(Kind::File);
                listing.push((*c, kind, name.clone()));
            }
            if let Some(h) = self.handles.get_mut(&fh) {
                h.listing = listing;
            }
        }
        let h = self.handle(fh)?;
        Ok(h.listing.iter().skip(offset as usize).cloned().collect())
    }

    /// `fsyncdir`: makes the directory's current entries durable.
    pub fn fsyncdir(&mut self, ino: Ino) -> Res<()> {
        self.dir(ino)?;
        let after = self.before(Op::Fsyncdir, |m| m.paths_of(ino))?;
        let dropped: Vec<Ino> = {
            let d = self.dir_mut(ino)?;
            let dropped = d
                .dur
                .iter()
                .filter(|(name, child)| d.cur.get(*name) != Some(child))
                .map(|(_, c)| *c)
                .collect();
            d.dur = d.cur.clone();
            dropped
        };
        for c in dropped {
            self.collect_if_orphan(c);
        }
        self.after(after, Ok(()))
    }

    /// `access`: everything is allowed (we run as root); only liveness is checked.
    pub fn access(&self, ino: Ino) -> Res<()> {
        self.node(ino).map(|_| ())
    }
}
