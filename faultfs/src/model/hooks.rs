//! Triggers (`arm`), error injections (`fail`) and the space limit: what runs before and
//! after each operation that changes the file system.

use super::{
    normalize, normalize_prefix, Content, Fired, Injection, Model, Op, Res, Trigger, When,
};

impl Model {
    // ----- triggers and injections --------------------------------------------------------

    fn hooks_active(&self) -> bool {
        !self.triggers.is_empty() || !self.injections.is_empty()
    }

    /// Runs before an operation: a matching `arm cut` cuts and fails it with EIO, a matching
    /// `fail` fails it with its errno; matching `arm cut-after` triggers are consumed and
    /// returned for [`Model::after`]. Paths are computed only while something is armed.
    pub(super) fn before(
        &mut self,
        op: Op,
        paths: impl FnOnce(&Model) -> Vec<String>,
    ) -> Res<Vec<Trigger>> {
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
    pub(super) fn after<T>(&mut self, after: Vec<Trigger>, result: Res<T>) -> Res<T> {
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
    pub(super) fn used(&self) -> u64 {
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
    pub(super) fn check_space(&self, old: u64, new: u64) -> Res<()> {
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
}
