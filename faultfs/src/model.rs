//! The simulated page cache: durable vs. current state of every file and directory, power
//! cuts, dead subtrees, triggers and error injection. No FUSE here; [`crate::fs`] adapts it.
//!
//! Every method returns `Result<_, i32>` with a positive errno, ready to hand to the kernel.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::extents::Extents;

/// Inode number; stable for the life of the process and never reused.
pub type Ino = u64;
/// Inode number of the root directory.
pub const ROOT: Ino = 1;
/// Result carrying a positive errno on failure.
pub type Res<T> = Result<T, i32>;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (its target is fixed at creation, so only its directory entry matters).
    Symlink,
}

/// Operation kinds that triggers (`arm`) and injections (`fail`) match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `fsync`/`fdatasync` of a file.
    Fsync,
    /// `fsync` of a directory.
    Fsyncdir,
    /// Any rename; matched on the source or the destination path.
    Rename,
    /// `write` to a file.
    Write,
    /// Creation of a regular file (create, mknod).
    Create,
    /// `mkdir`.
    Mkdir,
    /// `unlink`.
    Unlink,
    /// `rmdir`.
    Rmdir,
    /// Hard link; matched on the new path or an existing path of the file.
    Link,
    /// Size change through truncate/ftruncate/O_TRUNC.
    Truncate,
    /// `fallocate`.
    Fallocate,
    /// `symlink`.
    Symlink,
}

impl Op {
    /// Every op kind with its command-line name.
    pub const ALL: [(Op, &'static str); 12] = [
        (Op::Fsync, "fsync"),
        (Op::Fsyncdir, "fsyncdir"),
        (Op::Rename, "rename"),
        (Op::Write, "write"),
        (Op::Create, "create"),
        (Op::Mkdir, "mkdir"),
        (Op::Unlink, "unlink"),
        (Op::Rmdir, "rmdir"),
        (Op::Link, "link"),
        (Op::Truncate, "truncate"),
        (Op::Fallocate, "fallocate"),
        (Op::Symlink, "symlink"),
    ];

    /// Parses a command-line name such as `fsync`.
    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.iter().find(|(_, n)| *n == s).map(|(o, _)| *o)
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        Op::ALL
            .iter()
            .find(|(o, _)| *o == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// When an armed trigger cuts relative to the operation it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Cut instead of performing the operation (which then fails with EIO).
    Instead,
    /// Perform the operation, then cut; the operation's own result is returned.
    After,
}

#[derive(Debug, Clone)]
struct Trigger {
    id: u64,
    when: When,
    op: Op,
    prefix: String,
    scope: String,
}

#[derive(Debug, Clone)]
struct Injection {
    op: Op,
    prefix: String,
    errno: i32,
    remaining: Option<u64>,
}

/// A trigger that has fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The id `arm` returned.
    pub id: u64,
    /// The operation kind that fired it.
    pub op: Op,
    /// The path of that operation that matched the prefix.
    pub path: String,
}

/// Inode attributes that are kept (in memory) but are not part of the durability model.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// Permission bits (no file type bits).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time.
    pub atime: SystemTime,
    /// Modification time.
    pub mtime: SystemTime,
    /// Change time.
    pub ctime: SystemTime,
    /// Creation time.
    pub crtime: SystemTime,
}

impl Meta {
    fn new(perm: u32, uid: u32, gid: u32) -> Meta {
        let now = SystemTime::now();
        Meta {
            perm: perm & 0o7777,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
        }
    }

    fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

/// What `getattr` reports.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// Kind.
    pub kind: Kind,
    /// Current size.
    pub size: u64,
    /// Current link count.
    pub nlink: u32,
    /// Permissions, owner and times.
    pub meta: Meta,
}

/// A regular file: durable bytes live in `BACKING/data/<ino>` (exactly `durable_len` long);
/// current content = backing bytes below `base_len`, zeros above, overlaid with `dirty`.
#[derive(Debug, Default)]
struct FileData {
    durable_len: u64,
    cur_len: u64,
    /// `min(durable_len, smallest cur_len since the last sync)`: bytes of the backing file
    /// at or beyond this were cut off by a truncate and must read as zeros if re-extended.
    base_len: u64,
    dirty: Extents,
    /// The last unsynced write (offset, bytes), for `torn`.
    last_write: Option<(u64, Vec<u8>)>,
    /// `torn` was requested: the next cut applies half of `last_write`.
    torn: bool,
    backing: Option<File>,
}

impl FileData {
    fn is_clean(&self) -> bool {
        self.dirty.is_empty()
            && self.cur_len == self.durable_len
            && self.base_len == self.durable_len
    }

    fn reset_to_durable(&mut self) {
        self.dirty.clear();
        self.cur_len = self.durable_len;
        self.base_len = self.durable_len;
        self.last_write = None;
    }
}

#[derive(Debug, Default)]
struct DirData {
    cur: BTreeMap<OsString, Ino>,
    dur: BTreeMap<OsString, Ino>,
}

#[derive(Debug)]
enum Content {
    File(FileData),
    Dir(DirData),
    Symlink(PathBuf),
}

#[derive(Debug)]
struct Inode {
    content: Content,
    meta: Meta,
    /// Current-namespace links `(parent, name)`; its size is the reported nlink of a file.
    links: BTreeSet<(Ino, OsString)>,
    /// In a cut subtree that has not been revived: every operation fails with EIO.
    dead: bool,
    /// Number of valid open handles; an open inode stays alive when unlinked.
    open: u32,
}

impl Inode {
    fn kind(&self) -> Kind {
        match self.content {
            Content::File(_) => Kind::File,
            Content::Dir(_) => Kind::Dir,
            Content::Symlink(_) => Kind::Symlink,
        }
    }
}

#[derive(Debug)]
struct Handle {
    ino: Ino,
    /// False once a cut invalidated it: every use fails with EIO, even after revive.
    valid: bool,
    append: bool,
    /// Directory listing taken when reading from offset 0, so offsets stay stable.
    listing: Vec<(Ino, Kind, OsString)>,
}

/// One directory entry as returned by [`Model::readdir`].
pub type DirEntry = (Ino, Kind, OsString);

/// Counters reported by `stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live regular files.
    pub files: u64,
    /// Live directories (root included).
    pub dirs: u64,
    /// Bytes held in dirty extents.
    pub dirty_bytes: u64,
    /// Files with any unsynced change (data or size).
    pub dirty_files: u64,
    /// Open handles (valid ones).
    pub handles: u64,
    /// Sum of current file sizes (what the space limit counts).
    pub used_bytes: u64,
    /// Prefixes cut and not yet revived (`/` for the whole FS).
    pub dead: Vec<String>,
}

/// The whole simulated file system.
#[derive(Debug)]
pub struct Model {
    data_dir: PathBuf,
    inodes: HashMap<Ino, Inode>,
    next_ino: Ino,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Inodes deleted by a cut: the kernel may still name them; answer EIO, not ENOENT.
    tombstones: HashSet<Ino>,
    dead_prefixes: Vec<String>,
    triggers: Vec<Trigger>,
    injections: Vec<Injection>,
    fired: Vec<Fired>,
    next_id: u64,
    /// Capacity in bytes when a space limit is set.
    capacity: Option<u64>,
}

/// Normalises a user path: no leading or trailing `/`, `.` and empty components dropped.
pub fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Normalises a match prefix: only the leading `/` goes, so `data/` still means "inside data".
fn normalize_prefix(prefix: &str) -> String {
    prefix.trim_start_matches('/').to_string()
}

fn join(parent: &str, name: &OsStr) -> String {
    let name = name.to_string_lossy();
    if parent.is_empty() {
        name.into_owned()
    } else {
        format!("{parent}/{name}")
    }
}

fn io_errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Model {
    /// A fresh, durable, empty root. `backing` gets a `data/` folder holding one file per
    /// inode with durable bytes; whatever was there before is deleted.
    pub fn new(backing: &Path) -> io::Result<Model> {
        let data_dir = backing.join("data");
        if data_dir.exists() {
            fs::remove_dir_all(&data_dir)?;
        }
        fs::create_dir_all(&data_dir)?;
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT,
            Inode {
                content: Content::Dir(DirData::default()),
                meta: Meta::new(0o755, 0, 0),
                links: BTreeSet::new(),
                dead: false,
                open: 0,
            },
        );
        Ok(Model {
            data_dir,
            inodes,
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
            tombstones: HashSet::new(),
            dead_prefixes: Vec::new(),
            triggers: Vec::new(),
            injections: Vec::new(),
            fired: Vec::new(),
            next_id: 1,
            capacity: None,
        })
    }

    /// Directory holding the durable bytes (`<ino>` files).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    // ----- lookups and checks -------------------------------------------------------------

    fn node(&self, ino: Ino) -> Res<&Inode> {
        match self.inodes.get(&ino) {
            Some(n) if n.dead => Err(libc::EIO),
            Some(n) => Ok(n),
            None if self.tombstones.contains(&ino) => Err(libc::EIO),
            None => Err(libc::ENOENT),
        }
    }

    fn node_mut(&mut self, ino: Ino) -> Res<&mut Inode> {
        self.node(ino)?;
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: Ino) -> Res<&DirData> {
        match &self.node(ino)?.content {
            Content::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> Res<&mut DirData> {
        match &mut self.node_mut(ino)?.content {
            Content::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: Ino) -> Res<&mut FileData> {
        match &mut self.node_mut(ino)?.content {
            Content::File(f) => Ok(f),
            Content::Dir(_) => Err(libc::EISDIR),
            Content::Symlink(_) => Err(libc::EINVAL),
        }
    }

    fn handle(&self, fh: u64) -> Res<&Handle> {
        match self.handles.get(&fh) {
            Some(h) if h.valid => Ok(h),
            Some(_) => Err(libc::EIO),
            None => Err(libc::EBADF),
        }
    }

    fn check_name(name: &OsStr) -> Res<()> {
        let b = name.as_bytes();
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
            return Err(libc::EINVAL);
        }
        if b.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        Ok(())
    }

    /// Resolves `path` (relative to the mount root) in the current namespace, ignoring death.
    pub fn resolve(&self, path: &str) -> Res<Ino> {
        let mut ino = ROOT;
        for comp in normalize(path).split('/').filter(|c| !c.is_empty()) {
            let n = self.inodes.get(&ino).ok_or(libc::ENOENT)?;
            match &n.content {
                Content::Dir(d) => ino = *d.cur.get(OsStr::new(comp)).ok_or(libc::ENOENT)?,
                _ => return Err(libc::ENOTDIR),
            }
        }
        Ok(ino)
    }

    /// Every current path of `ino` (several for hard links, none when unlinked).
    pub fn paths_of(&self, ino: Ino) -> Vec<String> {
        self.paths_depth(ino, 0)
    }

    fn paths_depth(&self, ino: Ino, depth: usize) -> Vec<String> {
        if ino == ROOT {
            return vec![String::new()];
        }
        if depth > 4096 {
            return Vec::new();
        }
        let Some(n) = self.inodes.get(&ino) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (p, name) in &n.links {
            for pp in self.paths_depth(*p, depth + 1) {
                out.push(join(&pp, name));
            }
        }
        out
    }

    fn child_path(&self, parent: Ino, name: &OsStr) -> Vec<String> {
        self.paths_of(parent)
            .into_iter()
            .map(|p| join(&p, name))
            .collect()
    }

    fn alloc(&mut self, content: Content, meta: Meta) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                content,
                meta,
                links: BTreeSet::new(),
                dead: false,
                open: 0,
            },
        );
        ino
    }

    fn add_entry(&mut self, parent: Ino, name: &OsStr, ino: Ino) {
        if let Some(Inode {
            content: Content::Dir(d),
            meta,
            ..
        }) = self.inodes.get_mut(&parent)
        {
            d.cur.insert(name.to_os_string(), ino);
            meta.touch();
        }
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.links.insert((parent, name.to_os_string()));
            n.meta.ctime = SystemTime::now();
        }
    }

    fn remove_entry(&mut self, parent: Ino, name: &OsStr) -> Option<Ino> {
        let ino = match self.inodes.get_mut(&parent) {
            Some(Inode {
                content: Content::Dir(d),
                meta,
                ..
            }) => {
                let ino = d.cur.remove(name)?;
                meta.touch();
                ino
            }
            _ => return None,
        };
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.links.remove(&(parent, name.to_os_string()));
            n.meta.ctime = SystemTime::now();
        }
        Some(ino)
    }

    // ----- triggers and injections --------------------------------------------------------

    fn hooks_active(&self) -> bool {
        !self.triggers.is_empty() || !self.injections.is_empty()
    }

    /// Runs before an operation: a matching `arm cut` cuts and fails it with EIO, a matching
    /// `fail` fails it with its errno; matching `arm cut-after` triggers are consumed and
    /// returned for [`Model::after`]. Paths are computed only while something is armed.
    fn before(&mut self, op: Op, paths: impl FnOnce(&Model) -> Vec<String>) -> Res<Vec<Trigger>> {
        if !self.hooks_active() {
            return Ok(Vec::new());
        }
        let paths = paths(self);
        let matching = |prefix: &str| paths.iter().find(|p| p.starts_with(prefix)).cloned();
        if let Some((i, path)) = self
            .triggers
            .iter()
            .enumerate()
            .filter(|(_, t)| t.op == op && t.when == When::Instead)
            .find_map(|(i, t)| matching(&t.prefix).map(|p| (i, p)))
        {
            let t = self.triggers.remove(i);
            self.fire(&t, path);
            return Err(libc::EIO);
        }
        if let Some(i) = self
            .injections
            .iter()
            .position(|j| j.op == op && matching(&j.prefix).is_some())
        {
            let errno = self.injections[i].errno;
            if let Some(r) = &mut self.injections[i].remaining {
                *r -= 1;
                if *r == 0 {
                    self.injections.remove(i);
                }
            }
            return Err(errno);
        }
        let mut after = Vec::new();
        let mut i = 0;
        while i < self.triggers.len() {
            let t = &self.triggers[i];
            if t.op == op && t.when == When::After {
                if let Some(p) = matching(&t.prefix) {
                    let t = self.triggers.remove(i);
                    self.fired.push(Fired {
                        id: t.id,
                        op,
                        path: p,
                    });
                    after.push(t);
                    continue;
                }
            }
            i += 1;
        }
        Ok(after)
    }

    /// Runs the cuts of `cut-after` triggers returned by [`Model::before`].
    fn after<T>(&mut self, after: Vec<Trigger>, result: Res<T>) -> Res<T> {
        for t in after {
            self.cut_or_all(&t.scope);
        }
        result
    }

    fn fire(&mut self, t: &Trigger, path: String) {
        self.fired.push(Fired {
            id: t.id,
            op: t.op,
            path,
        });
        self.cut_or_all(&t.scope);
    }

    /// A trigger's scope may have vanished by the time it fires; then the whole FS is cut
    /// (a cut is never silently skipped).
    fn cut_or_all(&mut self, scope: &str) {
        if self.cut(scope).is_err() {
            let _ = self.cut("");
        }
    }

    /// Arms a one-shot cut on the next `op` whose path starts with `prefix`; returns its id.
    pub fn arm(&mut self, when: When, op: Op, prefix: &str, scope: &str) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.triggers.push(Trigger {
            id,
            when,
            op,
            prefix: normalize_prefix(prefix),
            scope: normalize(scope),
        });
        id
    }

    /// Triggers fired since the last `clear`, oldest first.
    pub fn fired(&self) -> &[Fired] {
        &self.fired
    }

    /// Makes the next `count` (None: all until cleared) `op`s under `prefix` fail with `errno`.
    pub fn fail(&mut self, op: Op, prefix: &str, errno: i32, count: Option<u64>) {
        if count == Some(0) {
            return;
        }
        self.injections.push(Injection {
            op,
            prefix: normalize_prefix(prefix),
            errno,
            remaining: count,
        });
    }

    /// Sets the free space to `bytes` from now on (None: no limit, report the backing FS).
    pub fn set_space(&mut self, bytes: Option<u64>) {
        self.capacity = bytes.map(|b| self.used() + b);
    }

    /// Drops triggers, the fired list, injections and the space limit.
    pub fn clear(&mut self) {
        self.triggers.clear();
        self.fired.clear();
        self.injections.clear();
        self.capacity = None;
    }

    /// Sum of the current sizes of files that are linked or open: an unlinked, closed file
    /// frees its space (in the current view) even while its unlink is not yet durable.
    fn used(&self) -> u64 {
        self.inodes
            .values()
            .filter(|n| !n.links.is_empty() || n.open > 0)
            .map(|n| match &n.content {
                Content::File(f) => f.cur_len,
                _ => 0,
            })
            .sum()
    }

    /// Fails with ENOSPC when growing a file from `old` to `new` bytes exceeds the limit.
    fn check_space(&self, old: u64, new: u64) -> Res<()> {
        match self.capacity {
            Some(cap) if new > old && self.used() + (new - old) > cap => Err(libc::ENOSPC),
            _ => Ok(()),
        }
    }

    /// `(total, free)` bytes when a space limit is set.
    pub fn space(&self) -> Option<(u64, u64)> {
        self.capacity
            .map(|cap| (cap, cap.saturating_sub(self.used())))
    }

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

    fn backing_path(&self, ino: Ino) -> PathBuf {
        self.data_dir.join(ino.to_string())
    }

    /// The backing file of `ino`, opened (and created) on first use and kept open.
    fn backing(&mut self, ino: Ino) -> Res<&File> {
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

    // ----- liveness -----------------------------------------------------------------------

    /// Inodes reachable from `roots` through current and durable entries.
    fn reachable(&self, roots: &[Ino]) -> HashSet<Ino> {
        let mut seen: HashSet<Ino> = HashSet::new();
        let mut stack: Vec<Ino> = roots.to_vec();
        while let Some(ino) = stack.pop() {
            if !seen.insert(ino) {
                continue;
            }
            if let Some(Inode {
                content: Content::Dir(d),
                ..
            }) = self.inodes.get(&ino)
            {
                stack.extend(d.cur.values().chain(d.dur.values()).copied());
            }
        }
        seen.retain(|i| self.inodes.contains_key(i));
        seen
    }

    /// Cheap pre-check: an inode still linked in the current namespace or open is alive.
    fn collect_if_orphan(&mut self, ino: Ino) {
        if let Some(n) = self.inodes.get(&ino) {
            if n.links.is_empty() && n.open == 0 {
                self.collect_garbage(false);
            }
        }
    }

    /// Deletes inodes (and backing data) no longer reachable from the root through current
    /// or durable entries, nor held open. Returns how many went.
    fn collect_garbage(&mut self, tombstone: bool) -> usize {
        let mut roots = vec![ROOT];
        roots.extend(
            self.inodes
                .iter()
                .filter(|(_, n)| n.open > 0)
                .map(|(i, _)| *i),
        );
        let live = self.reachable(&roots);
        let gone: Vec<Ino> = self
            .inodes
            .keys()
            .filter(|i| !live.contains(i))
            .copied()
            .collect();
        for ino in &gone {
            self.inodes.remove(ino);
            let _ = fs::remove_file(self.backing_path(*ino));
            if tombstone {
                self.tombstones.insert(*ino);
            }
        }
        if !gone.is_empty() {
            let inodes = &self.inodes;
            let keep: Vec<(Ino, BTreeSet<(Ino, OsString)>)> = inodes
                .iter()
                .filter(|(_, n)| n.links.iter().any(|(p, _)| !inodes.contains_key(p)))
                .map(|(i, n)| {
                    let links = n
                        .links
                        .iter()
                        .filter(|(p, _)| inodes.contains_key(p))
                        .cloned()
                        .collect();
                    (*i, links)
                })
                .collect();
            for (i, links) in keep {
                if let Some(n) = self.inodes.get_mut(&i) {
                    n.links = links;
                }
            }
        }
        gone.len()
    }

    /// Recomputes every inode's current links from the directories' current entries.
    fn rebuild_links(&mut self) {
        let mut links: HashMap<Ino, BTreeSet<(Ino, OsString)>> = HashMap::new();
        for (ino, n) in &self.inodes {
            if let Content::Dir(d) = &n.content {
                for (name, c) in &d.cur {
                    links.entry(*c).or_default().insert((*ino, name.clone()));
                }
            }
        }
        for (ino, n) in self.inodes.iter_mut() {
            n.links = links.remove(ino).unwrap_or_default();
        }
    }

    // ----- power cuts and corruption ------------------------------------------------------

    /// Power cut of the subtree at `prefix` (empty or `/`: everything): every file and
    /// directory reachable from it (through current or durable entries) goes back to its
    /// durable state, unreachable inodes are deleted, open handles on them become invalid
    /// for good, and the subtree is dead (EIO) until [`Model::revive`]. Returns how many
    /// inodes were deleted.
    pub fn cut(&mut self, prefix: &str) -> Res<usize> {
        let top = self.resolve(prefix)?;
        // A whole-FS cut also hits files that are open but no longer linked anywhere.
        let scope: HashSet<Ino> = if top == ROOT {
            self.inodes.keys().copied().collect()
        } else {
            self.reachable(&[top])
        };
        for ino in &scope {
            if let Err(e) = self.apply_torn(*ino) {
                // The cut itself must happen regardless; a failed torn write is only reported.
                eprintln!("hashq-faultfs: torn write on inode {ino} failed: errno {e}");
            }
            let Some(n) = self.inodes.get_mut(ino) else {
                continue;
            };
            match &mut n.content {
                Content::File(f) => {
                    f.reset_to_durable();
                    f.torn = false;
                }
                Content::Dir(d) => d.cur = d.dur.clone(),
                Content::Symlink(_) => {}
            }
            n.dead = true;
        }
        for h in self.handles.values_mut() {
            if h.valid && scope.contains(&h.ino) {
                h.valid = false;
                if let Some(n) = self.inodes.get_mut(&h.ino) {
                    n.open = n.open.saturating_sub(1);
                }
            }
        }
        self.rebuild_links();
        let p = normalize(prefix);
        let p = if p.is_empty() { "/".to_string() } else { p };
        if !self.dead_prefixes.contains(&p) {
            self.dead_prefixes.push(p);
        }
        Ok(self.collect_garbage(true))
    }

    /// If `torn` was requested for `ino`, writes the first half (`len / 2` bytes, rounded
    /// down) of its last unsynced write to the durable content.
    fn apply_torn(&mut self, ino: Ino) -> Res<()> {
        let (off, half) = match self.inodes.get_mut(&ino).map(|n| &mut n.content) {
            Some(Content::File(f)) if f.torn => match f.last_write.take() {
                Some((off, mut data)) => {
                    data.truncate(data.len() / 2);
                    (off, data)
                }
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        let file = self.backing(ino)?.try_clone().map_err(io_errno)?;
        file.write_all_at(&half, off).map_err(io_errno)?;
        let f = self.file_mut_any(ino)?;
        f.durable_len = f.durable_len.max(off + half.len() as u64);
        Ok(())
    }

    fn file_mut_any(&mut self, ino: Ino) -> Res<&mut FileData> {
        match self.inodes.get_mut(&ino).map(|n| &mut n.content) {
            Some(Content::File(f)) => Ok(f),
            _ => Err(libc::EIO),
        }
    }

    /// Brings a dead subtree back (everything at or below `prefix`). Handles invalidated by
    /// the cut stay invalid.
    pub fn revive(&mut self, prefix: &str) -> Res<()> {
        let p = normalize(prefix);
        if p.is_empty() {
            for n in self.inodes.values_mut() {
                n.dead = false;
            }
            self.dead_prefixes.clear();
            return Ok(());
        }
        let top = self.resolve(&p)?;
        for ino in self.reachable(&[top]) {
            if let Some(n) = self.inodes.get_mut(&ino) {
                n.dead = false;
            }
        }
        self.dead_prefixes
            .retain(|d| !(d == &p || d.starts_with(&format!("{p}/"))));
        Ok(())
    }

    /// Marks `path` so that the next cut affecting it makes its last unsynced write durable
    /// half-done (first `len / 2` bytes).
    pub fn torn(&mut self, path: &str) -> Res<()> {
        let ino = self.resolve(path)?;
        match self.inodes.get_mut(&ino).map(|n| &mut n.content) {
            Some(Content::File(f)) => {
                f.torn = true;
                Ok(())
            }
            _ => Err(libc::EISDIR),
        }
    }

    /// Flips bit `bit` of byte `off` of `path` in both its durable and its current content
    /// (where the byte exists in each).
    pub fn flip(&mut self, path: &str, off: u64, bit: u8) -> Res<()> {
        if bit > 7 {
            return Err(libc::EINVAL);
        }
        let ino = self.resolve(path)?;
        let mask = 1u8 << bit;
        let (durable_len, cur_len) = match &self.inodes.get(&ino).ok_or(libc::ENOENT)?.content {
            Content::File(f) => (f.durable_len, f.cur_len),
            _ => return Err(libc::EISDIR),
        };
        if off >= durable_len && off >= cur_len {
            return Err(libc::EINVAL);
        }
        let before = self.read_byte_any(ino, off, cur_len)?;
        if off < durable_len {
            let file = self.backing(ino)?.try_clone().map_err(io_errno)?;
            let mut b = [0u8];
            file.read_exact_at(&mut b, off).map_err(io_errno)?;
            b[0] ^= mask;
            file.write_all_at(&b, off).map_err(io_errno)?;
        }
        if let Some(before) = before {
            // The current byte may or may not come from the backing file; pin it explicitly.
            if self.read_byte_any(ino, off, cur_len)? != Some(before ^ mask) {
                let f = self.file_mut_any(ino)?;
                f.dirty.write(off, &[before ^ mask]);
            }
        }
        Ok(())
    }

    /// The current byte at `off` ignoring death, or None beyond the current size.
    fn read_byte_any(&mut self, ino: Ino, off: u64, cur_len: u64) -> Res<Option<u8>> {
        if off >= cur_len {
            return Ok(None);
        }
        let f = self.file_mut_any(ino)?;
        if let Some(b) = f.dirty.get(off) {
            return Ok(Some(b));
        }
        if off >= f.base_len {
            return Ok(Some(0));
        }
        let file = self.backing(ino)?;
        let mut b = [0u8];
        file.read_exact_at(&mut b, off).map_err(io_errno)?;
        Ok(Some(b[0]))
    }

    /// Counters for `stats`.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            handles: self.handles.values().filter(|h| h.valid).count() as u64,
            used_bytes: self.used(),
            dead: self.dead_prefixes.clone(),
            ..Stats::default()
        };
        for n in self.inodes.values() {
            match &n.content {
                Content::File(f) => {
                    s.files += 1;
                    s.dirty_bytes += f.dirty.bytes();
                    if !f.is_clean() {
                        s.dirty_files += 1;
                    }
                }
                Content::Dir(_) => s.dirs += 1,
                Content::Symlink(_) => {}
            }
        }
        s
    }

    /// Names in the current entries of directory `path` (ignores death; for tests).
    pub fn list(&self, path: &str) -> Res<Vec<String>> {
        let ino = self.resolve(path)?;
        match &self.inodes.get(&ino).ok_or(libc::ENOENT)?.content {
            Content::Dir(d) => Ok(d
                .cur
                .keys()
                .map(|k| k.to_string_lossy().into_owned())
                .collect()),
            _ => Err(libc::ENOTDIR),
        }
    }

    /// Number of backing files on disk (for tests: deleted inodes leave none behind).
    pub fn backing_files(&self) -> usize {
        fs::read_dir(&self.data_dir).map(|d| d.count()).unwrap_or(0)
    }
}
