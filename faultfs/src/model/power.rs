//! Power cuts and corruption: what a cut keeps and drops, dead subtrees and `revive`, torn
//! writes, bit flips, and collecting inodes nothing reaches any more.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::FileExt;

use super::{io_errno, normalize, Content, FileData, Ino, Inode, Model, Res, ROOT};

impl Model {
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
    pub(super) fn collect_if_orphan(&mut self, ino: Ino) {
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

    pub(super) fn file_mut_any(&mut self, ino: Ino) -> Res<&mut FileData> {
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
}
