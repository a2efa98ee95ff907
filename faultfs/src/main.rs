//! `hashq-faultfs --backing DIR --mountpoint DIR --control SOCKET_PATH [--threads N]`
//!
//! Mounts the fault-injecting file system, serves the control socket, prints `ready` once
//! both are up, and unmounts on `quit`, SIGTERM or SIGINT. See the library docs for the model.

use std::fs;
use std::io::{self, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use fuser::{Config, MountOption};
use hashq_faultfs::control::{self, After};
use hashq_faultfs::fs::FaultFs;
use hashq_faultfs::model::Model;

const USAGE: &str =
    "usage: hashq-faultfs --backing DIR --mountpoint DIR --control SOCKET_PATH [--threads N]";

struct Args {
    backing: PathBuf,
    mountpoint: PathBuf,
    control: PathBuf,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut backing = None;
    let mut mountpoint = None;
    let mut control = None;
    let mut threads = 2;
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy().into_owned();
        if a == "-h" || a == "--help" {
            return Err(USAGE.into());
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        match a.as_str() {
            "--backing" => backing = Some(PathBuf::from(v)),
            "--mountpoint" => mountpoint = Some(PathBuf::from(v)),
            "--control" => control = Some(PathBuf::from(v)),
            "--threads" => {
                threads = v
                    .to_string_lossy()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("bad --threads {v:?}"))?
            }
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    Ok(Args {
        backing: backing.ok_or(USAGE)?,
        mountpoint: mountpoint.ok_or(USAGE)?,
        control: control.ok_or(USAGE)?,
        threads,
    })
}

enum Event {
    Quit,
    Signal(i32),
}

/// Blocks SIGTERM/SIGINT in this thread (and so in every thread spawned later) and turns
/// them into events on a dedicated `sigwait` thread; no async-signal-safety concerns.
fn watch_signals(tx: mpsc::Sender<Event>) -> io::Result<()> {
    // SAFETY: plain sigset manipulation on a local, zero-initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        set
    };
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is a valid signal set and `sig` a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = tx.send(Event::Signal(sig));
            }
        })?;
    Ok(())
}

/// Backing files are kept open; allow as many as the hard limit permits.
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, local rlimit struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn listen(path: &Path, model: Arc<Mutex<Model>>, tx: mpsc::Sender<Event>) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (model, tx) = (model.clone(), tx.clone());
                let _ = thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Ok(After::Quit) = control::serve(&model, stream) {
                            let _ = tx.send(Event::Quit);
                        }
                    });
            }
        })?;
    Ok(())
}

fn run(args: Args) -> Result<(), String> {
    let backing = fs::canonicalize(&args.backing)
        .map_err(|e| format!("backing {}: {e}", args.backing.display()))?;
    let mountpoint = fs::canonicalize(&args.mountpoint)
        .map_err(|e| format!("mountpoint {}: {e}", args.mountpoint.display()))?;
    // Backing I/O from inside the mount would deadlock the FUSE server on itself.
    if backing.starts_with(&mountpoint) {
        return Err("the backing directory must not be inside the mount point".into());
    }
    let (tx, rx) = mpsc::channel();
    watch_signals(tx.clone()).map_err(|e| format!("signals: {e}"))?;
    raise_nofile_limit();

    let model = Arc::new(Mutex::new(
        Model::new(&backing).map_err(|e| format!("backing {}: {e}", backing.display()))?,
    ));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("hashq-faultfs".into()),
        MountOption::Subtype("hashq-faultfs".into()),
        MountOption::RW,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    config.n_threads = Some(args.threads);
    let session = fuser::spawn_mount(FaultFs::new(model.clone(), &backing), &mountpoint, &config)
        .map_err(|e| format!("mount on {}: {e}", mountpoint.display()))?;

    if let Err(e) = listen(&args.control, model, tx) {
        let _ = session.umount_and_join();
        return Err(format!("control socket {}: {e}", args.control.display()));
    }
    println!("ready");
    let _ = io::stdout().flush();

    let reason = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Quit) => break "quit".to_string(),
            Ok(Event::Signal(s)) => break format!("signal {s}"),
            Err(mpsc::RecvTimeoutError::Timeout) if session.guard.is_finished() => {
                break "unmounted from outside".to_string()
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break "no event source".to_string(),
        }
    };
    eprintln!("hashq-faultfs: stopping ({reason})");
    let _ = fs::remove_file(&args.control);
    if let Err(e) = session.umount_and_join() {
        // Busy (a process still has files open there): detach lazily; the kernel drops the
        // connection once our /dev/fuse descriptor closes at exit.
        eprintln!("hashq-faultfs: unmount: {e}; detaching lazily");
        if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: `c` is a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hashq-faultfs: {e}");
            ExitCode::FAILURE
        }
    }
}
