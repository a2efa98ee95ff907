//! Attributes and the namespace: lookups, `setattr` and truncation, and the operations that
//! change directory entries (create, mkdir, symlink, unlink, rmdir, rename, link).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::SystemTime;

use super::{Attr, Content, DirData, FileData, Ino, Kind, Meta, Model, Op, Res};

impl Model {
    // ----- attributes ---------------------------------------------------------------------

    /// Attributes of a live inode.
    pub fn getattr(&self, ino: Ino) -> Res<Attr> {
        let n = self.node(ino)?;
        let (size, nlink) = match &n.content {
            Content::File(f) => (f.cur_len, n.links.len() as u32),
            Content::Dir(d) => {
                let subdirs = d
                    .cur
                    .values()
                    .filter(|c| {
                        matches!(
                            self.inodes.get(c).map(|c| &c.content),
                            Some(Content::Dir(_))
                        )
                    })
                    .count();
                (4096, 2 + subdirs as u32)
            }
            Content::Symlink(t) => (t.as_os_str().len() as u64, n.links.len() as u32),
        };
        Ok(Attr {
            ino,
            kind: n.kind(),
            size,
            nlink,
            meta: n.meta,
        })
    }

    /// Looks `name` up in `parent`.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Res<Attr> {
        let ino = *self.dir(parent)?.cur.get(name).ok_or(libc::ENOENT)?;
        self.getattr(ino)
    }

    /// Changes permissions, owner, times and/or size (truncate/extend).
    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &mut self,
        ino: Ino,
        fh: Option<u64>,
        perm: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Res<Attr> {
        if let Some(fh) = fh {
            self.handle(fh)?;
        }
        self.node(ino)?;
        if let Some(size) = size {
            self.truncate(ino, size)?;
        }
        let n = self.node_mut(ino)?;
        if let Some(p) = perm {
            n.meta.perm = p & 0o7777;
        }
        if let Some(u) = uid {
            n.meta.uid = u;
        }
        if let Some(g) = gid {
            n.meta.gid = g;
        }
        if let Some(t) = atime {
            n.meta.atime = t;
        }
        if let Some(t) = mtime {
            n.meta.mtime = t;
        }
        n.meta.ctime = SystemTime::now();
        self.getattr(ino)
    }

    /// Sets the current size of a file (the `truncate` op).
    pub fn truncate(&mut self, ino: Ino, size: u64) -> Res<()> {
        let old = match &self.node(ino)?.content {
            Content::File(f) => f.cur_len,
            Content::Dir(_) => return Err(libc::EISDIR),
            Content::Symlink(_) => return Err(libc::EINVAL),
        };
        let after = self.before(Op::Truncate, |m| m.paths_of(ino))?;
        let r = self.check_space(old, size).and_then(|()| {
            let f = self.file_mut(ino)?;
            if size < f.cur_len {
                f.dirty.truncate(size);
                f.base_len = f.base_len.min(size);
            }
            f.cur_len = size;
            self.node_mut(ino)?.meta.touch();
            Ok(())
        });
        self.after(after, r)
    }

    // ----- namespace ----------------------------------------------------------------------

    fn new_child_check(&self, parent: Ino, name: &OsStr) -> Res<()> {
        Self::check_name(name)?;
        if self.dir(parent)?.cur.contains_key(name) {
            return Err(libc::EEXIST);
        }
        Ok(())
    }

    /// Creates a regular file. Returns its attributes.
    pub fn mknod(&mut self, parent: Ino, name: &OsStr, perm: u32, uid: u32, gid: u32) -> Res<Attr> {
        self.new_child_check(parent, name)?;
        let after = self.before(Op::Create, |m| m.child_path(parent, name))?;
        let ino = self.alloc(
            Content::File(FileData::default()),
            Meta::new(perm, uid, gid),
        );
        self.add_entry(parent, name, ino);
        let r = self.getattr(ino);
        self.after(after, r)
    }

    /// `create`: opens `name` in `parent`, creating it if missing (EEXIST with `O_EXCL`).
    pub fn create(
        &mut self,
        parent: Ino,
        name: &OsStr,
        perm: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> Res<(Attr, u64)> {
        Self::check_name(name)?;
        if let Some(&ino) = self.dir(parent)?.cur.get(name) {
            if flags & libc::O_EXCL != 0 {
                return Err(libc::EEXIST);
            }
            let fh = self.open(ino, flags)?;
            return Ok((self.getattr(ino)?, fh));
        }
        let attr = self.mknod(parent, name, perm, uid, gid)?;
        // A cut-after trigger may already have killed the new file; open reports that.
        let fh = self.open(attr.ino, flags & !libc::O_TRUNC)?;
        Ok((attr, fh))
    }

    /// Creates a directory.
    pub fn mkdir(&mut self, parent: Ino, name: &OsStr, perm: u32, uid: u32, gid: u32) -> Res<Attr> {
        self.new_child_check(parent, name)?;
        let after = self.before(Op::Mkdir, |m| m.child_path(parent, name))?;
        let ino = self.alloc(Content::Dir(DirData::default()), Meta::new(perm, uid, gid));
        self.add_entry(parent, name, ino);
        let r = self.getattr(ino);
        self.after(after, r)
    }

    /// Creates a symbolic link.
    pub fn symlink(
        &mut self,
        parent: Ino,
        name: &OsStr,
        target: &Path,
        uid: u32,
        gid: u32,
    ) -> Res<Attr> {
        self.new_child_check(parent, name)?;
        let after = self.before(Op::Symlink, |m| m.child_path(parent, name))?;
        let ino = self.alloc(
            Content::Symlink(target.to_path_buf()),
            Meta::new(0o777, uid, gid),
        );
        self.add_entry(parent, name, ino);
        let r = self.getattr(ino);
        self.after(after, r)
    }

    /// Target of a symbolic link.
    pub fn readlink(&self, ino: Ino) -> Res<Vec<u8>> {
        match &self.node(ino)?.content {
            Content::Symlink(t) => Ok(t.as_os_str().as_bytes().to_vec()),
            _ => Err(libc::EINVAL),
        }
    }

    /// Removes a non-directory entry.
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Res<()> {
        let ino = *self.dir(parent)?.cur.get(name).ok_or(libc::ENOENT)?;
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(libc::EISDIR);
        }
        let after = self.before(Op::Unlink, |m| m.child_path(parent, name))?;
        self.remove_entry(parent, name);
        self.collect_if_orphan(ino);
        self.after(after, Ok(()))
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> Res<()> {
        let ino = *self.dir(parent)?.cur.get(name).ok_or(libc::ENOENT)?;
        if !self.dir(ino)?.cur.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        let after = self.before(Op::Rmdir, |m| m.child_path(parent, name))?;
        self.remove_entry(parent, name);
        self.collect_if_orphan(ino);
        self.after(after, Ok(()))
    }

    fn is_ancestor(&self, anc: Ino, mut ino: Ino) -> bool {
        for _ in 0..4096 {
            if ino == anc {
                return true;
            }
            match self.inodes.get(&ino).and_then(|n| n.links.iter().next()) {
                Some((p, _)) => ino = *p,
                None => return false,
            }
        }
        false
    }

    /// Renames (atomically replacing an existing target unless `RENAME_NOREPLACE`);
    /// `RENAME_EXCHANGE` swaps both entries.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        flags: u32,
    ) -> Res<()> {
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(libc::EINVAL);
        }
        Self::check_name(newname)?;
        let src = *self.dir(parent)?.cur.get(name).ok_or(libc::ENOENT)?;
        let dst = self.dir(newparent)?.cur.get(newname).copied();
        let src_kind = self.node(src)?.kind();
        if let Some(d) = dst {
            let dst_kind = self.node(d)?.kind();
            if noreplace {
                return Err(libc::EEXIST);
            }
            if !exchange {
                if src_kind == Kind::Dir && dst_kind != Kind::Dir {
                    return Err(libc::ENOTDIR);
                }
                if src_kind != Kind::Dir && dst_kind == Kind::Dir {
                    return Err(libc::EISDIR);
                }
                if dst_kind == Kind::Dir && d != src && !self.dir(d)?.cur.is_empty() {
                    return Err(libc::ENOTEMPTY);
                }
            }
        } else if exchange {
            return Err(libc::ENOENT);
        }
        // A directory may not move below itself.
        if src_kind == Kind::Dir && self.is_ancestor(src, newparent) {
            return Err(libc::EINVAL);
        }
        if let (true, Some(d)) = (exchange, dst) {
            if self.node(d)?.kind() == Kind::Dir && self.is_ancestor(d, parent) {
                return Err(libc::EINVAL);
            }
        }
        let after = self.before(Op::Rename, |m| {
            let mut p = m.child_path(parent, name);
            p.extend(m.child_path(newparent, newname));
            p
        })?;
        if dst == Some(src) {
            // Both names already refer to the same inode: POSIX says do nothing.
            return self.after(after, Ok(()));
        }
        if exchange {
            let d = dst.unwrap_or(src);
            self.remove_entry(parent, name);
            self.remove_entry(newparent, newname);
            self.add_entry(newparent, newname, src);
            self.add_entry(parent, name, d);
        } else {
            let replaced = self.remove_entry(newparent, newname);
            self.remove_entry(parent, name);
            self.add_entry(newparent, newname, src);
            if let Some(r) = replaced {
                self.collect_if_orphan(r);
            }
        }
        self.after(after, Ok(()))
    }

    /// Adds a hard link to a file.
    pub fn link(&mut self, ino: Ino, newparent: Ino, newname: &OsStr) -> Res<Attr> {
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(libc::EPERM);
        }
        self.new_child_check(newparent, newname)?;
        let after = self.before(Op::Link, |m| {
            let mut p = m.child_path(newparent, newname);
            p.extend(m.paths_of(ino));
            p
        })?;
        self.add_entry(newparent, newname, ino);
        let r = self.getattr(ino);
        self.after(after, r)
    }
}
