//! The control protocol: one command per line, one reply line per command, `ok[ payload]`
//! or `err <message>`. Server side ([`execute`]) and a typed client ([`Control`]).
//!
//! Paths and prefixes are relative to the mount root, `/` (or nothing) meaning the root, and
//! may not contain whitespace (tokens are whitespace-separated).
//!
//! | command | reply |
//! |---|---|
//! | `ping` | `ok` |
//! | `cut [PREFIX]` | `ok <inodes deleted>` |
//! | `revive [PREFIX]` | `ok` |
//! | `arm cut\|cut-after <op> <PATHPREFIX> [SCOPE]` | `ok <id>` |
//! | `fired` | `ok[ <id>:<op>:<path>]...` (oldest first, kept until `clear`) |
//! | `torn <PATH>` | `ok` |
//! | `flip <PATH> <OFFSET> [BIT]` | `ok` |
//! | `fail <op> <PATHPREFIX> ENOSPC\|EIO\|EDQUOT [COUNT]` | `ok` |
//! | `space <BYTES>\|unlimited` | `ok` |
//! | `clear` | `ok` |
//! | `stats` | `ok files=N dirs=N dirty_bytes=N dirty_files=N handles=N used_bytes=N dead=P,P\|-` |
//! | `quit` | `ok` (then the FS unmounts and the process exits) |
//!
//! `<op>` is one of fsync, fsyncdir, rename, write, create, mkdir, unlink, rmdir, link,
//! truncate, fallocate, symlink.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::model::{Fired, Model, Op, Stats, When};

/// What the server should do after answering a command.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Keep serving.
    Continue,
    /// Unmount and exit.
    Quit,
}

const ERRNOS: [(&str, i32); 3] = [
    ("ENOSPC", libc::ENOSPC),
    ("EIO", libc::EIO),
    ("EDQUOT", libc::EDQUOT),
];

fn errno_name(e: i32) -> Option<&'static str> {
    ERRNOS.iter().find(|(_, n)| *n == e).map(|(s, _)| *s)
}

fn describe(e: i32) -> String {
    io::Error::from_raw_os_error(e).to_string()
}

fn op_arg(s: Option<&str>) -> Result<Op, String> {
    let s = s.ok_or("missing <op>")?;
    Op::parse(s).ok_or_else(|| format!("unknown op {s:?}"))
}

fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad {what} {s:?}"))
}

/// Runs one command line against the model; returns the reply line (without newline).
pub fn execute(model: &Mutex<Model>, line: &str) -> (String, After) {
    let mut m = model.lock().unwrap_or_else(|e| e.into_inner());
    match run(&mut m, line) {
        Ok((payload, after)) if payload.is_empty() => ("ok".to_string(), after),
        Ok((payload, after)) => (format!("ok {payload}"), after),
        Err(msg) => (format!("err {msg}"), After::Continue),
    }
}

fn run(m: &mut Model, line: &str) -> Result<(String, After), String> {
    let mut t = line.split_whitespace();
    let cmd = t.next().unwrap_or("");
    let rest: Vec<&str> = t.collect();
    let arg = |i: usize| rest.get(i).copied();
    let max_args = |n: usize| {
        if rest.len() > n {
            Err(format!("too many arguments for {cmd}"))
        } else {
            Ok(())
        }
    };
    let done = |s: String| Ok((s, After::Continue));
    match cmd {
        "ping" => done(String::new()),
        "cut" => {
            max_args(1)?;
            let n = m.cut(arg(0).unwrap_or("")).map_err(describe)?;
            done(n.to_string())
        }
        "revive" => {
            max_args(1)?;
            m.revive(arg(0).unwrap_or("")).map_err(describe)?;
            done(String::new())
        }
        "arm" => {
            max_args(4)?;
            let when = match arg(0) {
                Some("cut") => When::Instead,
                Some("cut-after") => When::After,
                other => return Err(format!("arm expects cut or cut-after, got {other:?}")),
            };
            let op = op_arg(arg(1))?;
            let prefix = arg(2).ok_or("missing <PATHPREFIX>")?;
            let id = m.arm(when, op, prefix, arg(3).unwrap_or(""));
            done(id.to_string())
        }
        "fired" => {
            max_args(0)?;
            let list: Vec<String> = m
                .fired()
                .iter()
                .map(|f| format!("{}:{}:{}", f.id, f.op, f.path))
                .collect();
            done(list.join(" "))
        }
        "torn" => {
            max_args(1)?;
            m.torn(arg(0).ok_or("missing <PATH>")?).map_err(describe)?;
            done(String::new())
        }
        "flip" => {
            max_args(3)?;
            let path = arg(0).ok_or("missing <PATH>")?;
            let off = num(arg(1).ok_or("missing <OFFSET>")?, "offset")?;
            let bit = arg(2).map(|b| num(b, "bit")).transpose()?.unwrap_or(0);
            m.flip(path, off, bit).map_err(describe)?;
            done(String::new())
        }
        "fail" => {
            max_args(4)?;
            let op = op_arg(arg(0))?;
            let prefix = arg(1).ok_or("missing <PATHPREFIX>")?;
            let name = arg(2).ok_or("missing errno")?;
            let errno = ERRNOS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, e)| *e)
                .ok_or_else(|| format!("unsupported errno {name:?} (ENOSPC, EIO, EDQUOT)"))?;
            let count = arg(3).map(|c| num(c, "count")).transpose()?;
            m.fail(op, prefix, errno, count);
            done(String::new())
        }
        "space" => {
            max_args(1)?;
            match arg(0) {
                Some("unlimited") => m.set_space(None),
                Some(b) => m.set_space(Some(num(b, "byte count")?)),
                None => return Err("space expects <BYTES> or unlimited".into()),
            }
            done(String::new())
        }
        "clear" => {
            max_args(0)?;
            m.clear();
            done(String::new())
        }
        "stats" => {
            max_args(0)?;
            let s = m.stats();
            let dead = if s.dead.is_empty() {
                "-".to_string()
            } else {
                s.dead.join(",")
            };
            done(format!(
                "files={} dirs={} dirty_bytes={} dirty_files={} handles={} used_bytes={} dead={}",
                s.files, s.dirs, s.dirty_bytes, s.dirty_files, s.handles, s.used_bytes, dead
            ))
        }
        "quit" => Ok((String::new(), After::Quit)),
        "" => Err("empty command".into()),
        other => Err(format!("unknown command {other:?}")),
    }
}

/// Serves one control connection until EOF or `quit`; returns whether `quit` was asked.
pub fn serve(model: &Mutex<Model>, stream: UnixStream) -> io::Result<After> {
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let (reply, after) = execute(model, &line?);
        out.write_all(format!("{reply}\n").as_bytes())?;
        if after == After::Quit {
            return Ok(After::Quit);
        }
    }
    Ok(After::Continue)
}

/// Typed client of the control socket.
#[derive(Debug)]
pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn token(s: &str) -> io::Result<&str> {
    if s.chars().any(char::is_whitespace) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("control paths may not contain whitespace: {s:?}"),
        ));
    }
    Ok(if s.is_empty() { "/" } else { s })
}

fn bad_reply(line: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad reply from hashq-faultfs: {line:?}"),
    )
}

impl Control {
    /// Connects to the control socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Control> {
        let writer = UnixStream::connect(path)?;
        writer.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Control {
            reader: BufReader::new(writer.try_clone()?),
            writer,
        })
    }

    /// Sends one raw command line; returns the payload after `ok`, or an error carrying the
    /// message after `err`.
    pub fn command(&mut self, line: &str) -> io::Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "hashq-faultfs closed the control connection",
            ));
        }
        let reply = reply.trim_end();
        if reply == "ok" {
            Ok(String::new())
        } else if let Some(p) = reply.strip_prefix("ok ") {
            Ok(p.to_string())
        } else if let Some(e) = reply.strip_prefix("err ") {
            Err(io::Error::other(format!("{line}: {e}")))
        } else {
            Err(bad_reply(reply))
        }
    }

    /// Power cut of `prefix` (`""` or `"/"`: everything). Returns how many inodes were deleted.
    pub fn cut(&mut self, prefix: &str) -> io::Result<usize> {
        let p = self.command(&format!("cut {}", token(prefix)?))?;
        p.parse().map_err(|_| bad_reply(&p))
    }

    /// Brings a cut subtree back to life.
    pub fn revive(&mut self, prefix: &str) -> io::Result<()> {
        self.command(&format!("revive {}", token(prefix)?))
            .map(drop)
    }

    fn arm(&mut self, kind: &str, op: Op, prefix: &str, scope: Option<&str>) -> io::Result<u64> {
        let scope = scope.map(token).transpose()?.unwrap_or("/");
        let p = self.command(&format!("arm {kind} {op} {} {scope}", token(prefix)?))?;
        p.parse().map_err(|_| bad_reply(&p))
    }

    /// On the next `op` under `prefix`, cut `scope` (None: everything) instead of doing it.
    pub fn arm_cut(&mut self, op: Op, prefix: &str, scope: Option<&str>) -> io::Result<u64> {
        self.arm("cut", op, prefix, scope)
    }

    /// On the next `op` under `prefix`, do it, then cut `scope` (None: everything).
    pub fn arm_cut_after(&mut self, op: Op, prefix: &str, scope: Option<&str>) -> io::Result<u64> {
        self.arm("cut-after", op, prefix, scope)
    }

    /// Triggers fired since the last `clear`, oldest first.
    pub fn fired(&mut self) -> io::Result<Vec<Fired>> {
        let p = self.command("fired")?;
        p.split_whitespace()
            .map(|item| {
                let mut parts = item.splitn(3, ':');
                let id = parts.next().and_then(|s| s.parse().ok());
                let op = parts.next().and_then(Op::parse);
                let path = parts.next();
                match (id, op, path) {
                    (Some(id), Some(op), Some(path)) => Ok(Fired {
                        id,
                        op,
                        path: path.to_string(),
                    }),
                    _ => Err(bad_reply(&p)),
                }
            })
            .collect()
    }

    /// At the next cut affecting `path`, make its last unsynced write durable half-done.
    pub fn torn(&mut self, path: &str) -> io::Result<()> {
        self.command(&format!("torn {}", token(path)?)).map(drop)
    }

    /// Flips bit `bit` of byte `offset` of `path`, durable and current content alike.
    pub fn flip(&mut self, path: &str, offset: u64, bit: u8) -> io::Result<()> {
        self.command(&format!("flip {} {offset} {bit}", token(path)?))
            .map(drop)
    }

    /// The next `count` (None: until `clear`) `op`s under `prefix` fail with `errno`
    /// (`libc::ENOSPC`, `libc::EIO` or `libc::EDQUOT`).
    pub fn fail(&mut self, op: Op, prefix: &str, errno: i32, count: Option<u64>) -> io::Result<()> {
        let name = errno_name(errno).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported errno {errno}"),
            )
        })?;
        let count = count.map(|c| format!(" {c}")).unwrap_or_default();
        self.command(&format!("fail {op} {} {name}{count}", token(prefix)?))
            .map(drop)
    }

    /// Free space from now on (None: unlimited, statfs of the backing FS).
    pub fn space(&mut self, bytes: Option<u64>) -> io::Result<()> {
        let arg = bytes.map_or("unlimited".to_string(), |b| b.to_string());
        self.command(&format!("space {arg}")).map(drop)
    }

    /// Removes triggers, the fired list, injections and the space limit.
    pub fn clear(&mut self) -> io::Result<()> {
        self.command("clear").map(drop)
    }

    /// Counters.
    pub fn stats(&mut self) -> io::Result<Stats> {
        let p = self.command("stats")?;
        let mut s = Stats::default();
        for kv in p.split_whitespace() {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad_reply(&p))?;
            let n = || v.parse::<u64>().map_err(|_| bad_reply(&p));
            match k {
                "files" => s.files = n()?,
                "dirs" => s.dirs = n()?,
                "dirty_bytes" => s.dirty_bytes = n()?,
                "dirty_files" => s.dirty_files = n()?,
                "handles" => s.handles = n()?,
                "used_bytes" => s.used_bytes = n()?,
                "dead" if v != "-" => s.dead = v.split(',').map(str::to_string).collect(),
                _ => {}
            }
        }
        Ok(s)
    }

    /// Asks the server to unmount and exit.
    pub fn quit(&mut self) -> io::Result<()> {
        self.command("quit").map(drop)
    }
}
