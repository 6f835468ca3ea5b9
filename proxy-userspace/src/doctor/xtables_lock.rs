//! Whether someone holds the xtables lock. iptables-legacy takes it for
//! every change, and with `-w` (the masquerade fallback's restores, and
//! kubelet's and the CNI plugins' calls) waits for it: a holder that does
//! not let go stalls them all. Only tried, never waited for.

use std::{
    env, fs, io::ErrorKind, os::unix::fs::MetadataExt as _, path::PathBuf, thread, time::Duration,
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use super::{Check, Status};

/// Where iptables keeps the lock, unless `XTABLES_LOCKFILE` says otherwise.
const LOCK_FILE: &str = "/run/xtables.lock";
/// Every iptables call holds the lock for a moment: only one held across
/// these tries is worth a word.
const TRIES: u32 = 5;
const BETWEEN_TRIES: Duration = Duration::from_millis(100);

/// A lock on the file, from /proc/locks.
#[derive(Debug, PartialEq, Eq)]
struct Lock {
    /// 0 or less where the holder is not in this PID namespace, or the
    /// lock belongs to an open file description (OFD locks).
    pid: i32,
    /// Waiting for the lock (`->`), rather than holding it.
    waiting: bool,
}

/// The locks /proc/locks lists on the file at `device` (major, minor) and
/// `inode`. Its lines read `1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0
/// EOF`, a waiter's with `->` after the number; the device is in hex, the
/// inode in decimal.
fn locks_on(proc_locks: &str, device: (u32, u32), inode: u64) -> Vec<Lock> {
    proc_locks
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1).peekable();
            let waiting = fields.next_if_eq(&"->").is_some();
            // The kind, ADVISORY or MANDATORY, READ or WRITE.
            let mut fields = fields.skip(3);
            let pid = fields.next()?.parse().ok()?;
            let mut file = fields.next()?.split(':');
            let major = u32::from_str_radix(file.next()?, 16).ok()?;
            let minor = u32::from_str_radix(file.next()?, 16).ok()?;
            let file_inode: u64 = file.next()?.parse().ok()?;
            ((major, minor) == device && file_inode == inode).then_some(Lock { pid, waiting })
        })
        .collect()
}

/// The lock file iptables uses here.
fn lock_file() -> PathBuf {
    env::var_os("XTABLES_LOCKFILE")
        .filter(|path| !path.is_empty())
        .map_or_else(|| PathBuf::from(LOCK_FILE), PathBuf::from)
}

pub(super) fn xtables_lock() -> Check {
    const NAME: &str = "xtables-lock";
    let path = lock_file();
    let shown = path.display();
    let mut held = false;
    for attempt in 0..TRIES {
        if attempt > 0 {
            thread::sleep(BETWEEN_TRIES);
        }
        // Opened afresh each time: a failed try hands the file back only
        // with the error.
        let file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                return Check::ok(
                    NAME,
                    format!("no {shown}: iptables-legacy has not run on this node, nothing waits"),
                );
            }
            Err(error) => {
                return Check::problem(
                    NAME,
                    Status::Warn,
                    format!("cannot open {shown}: {error}"),
                    "run doctor as root",
                );
            }
        };
        // Shared: two doctors at once do not see each other, and iptables,
        // which locks exclusively, is still seen.
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_unlocked_on_drop) => {
                held = false;
                break;
            }
            Err((_, Errno::EWOULDBLOCK)) => held = true,
            Err((_, error)) => {
                return Check::problem(
                    NAME,
                    Status::Warn,
                    format!("cannot try {shown}: {error}"),
                    "run doctor as root",
                );
            }
        }
    }
    if !held {
        return Check::ok(NAME, format!("{shown} is free: iptables -w does not wait"));
    }
    held_check(&path)
}

/// The check for a lock held across every try: who holds it, and how many
/// wait.
fn held_check(path: &std::path::Path) -> Check {
    const NAME: &str = "xtables-lock";
    let shown = path.display();
    let locks = fs::metadata(path)
        .ok()
        .zip(fs::read_to_string("/proc/locks").ok())
        .map(|(file, proc_locks)| {
            let device = (libc::major(file.dev()), libc::minor(file.dev()));
            locks_on(&proc_locks, device, file.ino())
        })
        .unwrap_or_default();
    let holders: Vec<i32> = locks
        .iter()
        .filter(|lock| !lock.waiting && lock.pid > 0)
        .map(|lock| lock.pid)
        .collect();
    let names: Vec<String> = holders
        .iter()
        .map(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).map_or_else(
                |_| "a process that has just ended".to_owned(),
                |c| c.trim().to_owned(),
            )
        })
        .collect();
    let mut volatile: Vec<String> = holders
        .iter()
        .zip(&names)
        .map(|(pid, name)| format!("{name} is pid {pid}"))
        .collect();
    let waiting = locks.iter().filter(|lock| lock.waiting).count();
    if waiting > 0 {
        volatile.push(format!("{waiting} waiting"));
    }
    let holder = if names.is_empty() {
        "a process outside this PID namespace".to_owned()
    } else {
        names.join(" and ")
    };
    Check::problem(
        NAME,
        Status::Warn,
        format!("{shown} is held by {holder}: every iptables -w waits until it lets go"),
        "see what the holder is doing (its pid: in brackets in the table, or the JSON's volatile facts with --verbose); end it if it hangs",
    )
    .with_volatile(volatile)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_LOCKS: &str = "\
1: FLOCK  ADVISORY  WRITE 4242 00:1a:871 0 EOF
1: -> FLOCK  ADVISORY  WRITE 4343 00:1a:871 0 EOF
2: POSIX  ADVISORY  WRITE 77 fd:01:871 0 EOF
3: OFDLCK ADVISORY  READ  -1 00:1a:871 0 EOF
4: FLOCK  ADVISORY  WRITE 12 103:02:871 0 EOF
5: broken line
6: FLOCK  ADVISORY  WRITE x 00:1a:871 0 EOF
";

    #[test]
    fn the_locks_on_one_file_are_found_by_device_and_inode() {
        assert_eq!(
            locks_on(PROC_LOCKS, (0, 0x1a), 871),
            [
                Lock {
                    pid: 4242,
                    waiting: false
                },
                Lock {
                    pid: 4343,
                    waiting: true
                },
                Lock {
                    pid: -1,
                    waiting: false
                },
            ]
        );
        // The device's numbers are hex.
        assert_eq!(
            locks_on(PROC_LOCKS, (0x103, 2), 871),
            [Lock {
                pid: 12,
                waiting: false
            }]
        );
        assert!(locks_on(PROC_LOCKS, (0, 0x1a), 872).is_empty());
        assert!(locks_on("", (0, 0x1a), 871).is_empty());
    }
}
