//! The simulated page cache: durable vs. current state of every file and directory, power
//! cuts, dead subtrees, triggers and error injection. No FUSE here; [`crate::fs`] adapts it.
//!
//! Every method returns `Result<_, i32>` with a positive errno, ready to hand to the kernel.
//!
//! The types, lookups and checks are here; the rest of [`Model`] is split by concern:
//! triggers and injections in [`hooks`], attributes and directory entries in [`namespace`],
//! handles and contents in [`data`], power cuts and corruption in [`power`].

mod data;
mod hooks;
mod namespace;
mod power;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
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

    // ----- inspection ---------------------------------------------------------------------

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
