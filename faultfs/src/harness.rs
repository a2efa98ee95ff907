//! Spawning the `hashq-faultfs` binary for a test, and never leaving a mount behind.

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::control::Control;

/// How long [`Mounted::spawn`] waits for `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `hashq-faultfs` with its mount. Dropping it quits the process, kills it if it
/// does not exit, lazily unmounts (`fusermount3 -u -z`, then `umount -l`) as a fallback and
/// removes the temporary folder it made.
#[derive(Debug)]
pub struct Mounted {
    child: Option<Child>,
    base: PathBuf,
    owns_base: bool,
    mountpoint: PathBuf,
    backing: PathBuf,
    socket: PathBuf,
    control: Control,
}

fn unique_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "hashq-faultfs-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Mounted {
    /// Spawns `bin` on a fresh temporary folder (`backing/`, `mnt/`, `control.sock`) and
    /// waits for `ready`.
    pub fn spawn(bin: impl AsRef<Path>) -> io::Result<Mounted> {
        let base = unique_dir();
        fs::create_dir_all(&base)?;
        let mut m = Self::spawn_in(bin, &base);
        if let Ok(m) = &mut m {
            m.owns_base = true;
        } else {
            let _ = fs::remove_dir_all(&base);
        }
        m
    }

    /// Spawns `bin` using `base/backing`, `base/mnt` and `base/control.sock`.
    pub fn spawn_in(bin: impl AsRef<Path>, base: &Path) -> io::Result<Mounted> {
        let bin = bin.as_ref();
        let backing = base.join("backing");
        let mountpoint = base.join("mnt");
        let socket = base.join("control.sock");
        fs::create_dir_all(&backing)?;
        fs::create_dir_all(&mountpoint)?;
        let mut child = Command::new(bin)
            .arg("--backing")
            .arg(&backing)
            .arg("--mountpoint")
            .arg(&mountpoint)
            .arg("--control")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {}: {e}", bin.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        // Keep draining stdout for the life of the child so it never blocks on a full pipe.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim() == "ready" {
                    let _ = tx.send(());
                } else {
                    eprintln!("hashq-faultfs: {line}");
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Some(status) = child.try_wait()? {
                        return Err(io::Error::other(format!(
                            "hashq-faultfs exited before ready ({status}); is /dev/fuse usable \
                             and are we root (or is fusermount3 installed)?"
                        )));
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    lazy_unmount(&mountpoint);
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "hashq-faultfs did not print ready in time",
                    ));
                }
            }
        }
        let control = match Control::connect(&socket) {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                lazy_unmount(&mountpoint);
                return Err(e);
            }
        };
        Ok(Mounted {
            child: Some(child),
            base: base.to_path_buf(),
            owns_base: false,
            mountpoint,
            backing,
            socket,
            control,
        })
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// `mountpoint/rel`.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// The backing folder.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The control socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The control connection opened at start.
    pub fn control(&mut self) -> &mut Control {
        &mut self.control
    }

    /// Quits, waits for the process, unmounts. Errors if it did not exit cleanly.
    pub fn shutdown(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let quit = self.control.quit();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        lazy_unmount(&self.mountpoint);
        quit?;
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(io::Error::other(format!("hashq-faultfs exited with {s}"))),
            None => Err(io::Error::other("hashq-faultfs did not exit; killed")),
        }
    }
}

/// Best-effort lazy unmount of whatever is still mounted at `mountpoint`.
pub fn lazy_unmount(mountpoint: &Path) {
    if !is_mounted(mountpoint) {
        return;
    }
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .stderr(Stdio::null())
        .status();
    if is_mounted(mountpoint) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mountpoint)
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether `/proc/self/mounts` lists `mountpoint`.
pub fn is_mounted(mountpoint: &Path) -> bool {
    // Canonicalise the parent only: stat-ing the mount point itself would ask the FUSE server.
    let canon = match (mountpoint.parent(), mountpoint.file_name()) {
        (Some(p), Some(n)) => p
            .canonicalize()
            .map(|p| p.join(n))
            .unwrap_or_else(|_| mountpoint.to_path_buf()),
        _ => mountpoint.to_path_buf(),
    };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("hashq-faultfs: shutdown: {e}");
        }
        if self.owns_base && !is_mounted(&self.mountpoint) {
            let _ = fs::remove_dir_all(&self.base);
        }
    }
}
