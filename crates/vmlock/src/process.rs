//! Process facts read from `/proc`, shared by the API, the daemon and the CLI.

use std::fs;

/// Parsed fields of `/proc/PID/stat` that vmlock needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Single-letter state (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
    /// Start time in clock ticks since boot: with the pid, it names a process uniquely.
    pub start_time: u64,
    /// The process is exiting (the kernel's `PF_EXITING`): it may still run, closing its files,
    /// before it becomes a zombie.
    pub exiting: bool,
}

/// `PF_EXITING` in the kernel's flags word (field 9 of the stat line).
const PF_EXITING: u32 = 0x4;

/// Reads `/proc/PID/stat`; `None` when the process does not exist.
///
/// One `open` and usually one `read` into a buffer on the stack: the daemon reads this a few
/// times per registration, and `read_to_string` spent six more system calls each time (a
/// `statx` for the size, which procfs reports as 0, and reads of 32, 32, 64, 128 and 256 bytes).
pub fn stat(pid: u32) -> Option<ProcStat> {
    use std::io::Read;
    let mut file = fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    // The line is about 300 bytes; the fields read (up to the 22nd) are in its first few hundred,
    // so 1 KiB is enough even should a line be longer.
    let mut buf = [0u8; 1024];
    let mut len = 0;
    // procfs makes the whole line at the first read; the line ends with a newline, so no read
    // for the end of file is needed once it came.
    while len < buf.len() && !buf[..len].ends_with(b"\n") {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    parse_stat(std::str::from_utf8(&buf[..len]).ok()?)
}

/// Parses the text of `/proc/PID/stat`. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 4 = ppid; field 9 = flags; field 22 = starttime.
    let flags: u32 = fields.get(6)?.parse().ok()?;
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
        exiting: flags & PF_EXITING != 0,
    })
}

/// Whether `pid` exited or is exiting: gone, a zombie, or past the start of its exit (it may be
/// closing its files: its descriptors' ends were seen closed, but it is not a zombie yet).
pub fn has_exited_or_exiting(pid: u32) -> bool {
    !matches!(stat(pid), Some(s) if !s.exiting && s.state != 'Z' && s.state != 'X')
}

/// Whether `pid` is a live process (a zombie has closed its files, so it counts as gone).
pub fn is_running(pid: u32) -> bool {
    matches!(stat(pid), Some(s) if s.state != 'Z' && s.state != 'X')
}

/// The command name of `pid` (`/proc/PID/comm`), or `?`.
pub fn command(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let line =
            "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            ProcStat {
                state: 'S',
                ppid: 1,
                start_time: 98765,
                exiting: false,
            }
        );
        // The same process past the start of its exit: PF_EXITING (0x4) in its flags.
        let exiting = line.replace(" 4194560 ", " 4194564 ");
        assert!(parse_stat(&exiting).unwrap().exiting);
    }

    #[test]
    fn own_process_is_running() {
        assert!(is_running(std::process::id()));
        assert!(stat(std::process::id()).unwrap().start_time > 0);
        assert!(!is_running(u32::MAX - 1));
    }

    #[test]
    fn one_short_read_sees_what_a_whole_read_sees() {
        // A thread (a task with a /proc/TID/stat of its own) named with spaces and parentheses.
        // The state may change between two reads; the parent and the start time do not.
        let facts = |s: Option<ProcStat>| s.map(|s| (s.ppid, s.start_time));
        let whole = fs::read_to_string("/proc/self/stat").unwrap();
        assert_eq!(facts(stat(std::process::id())), facts(parse_stat(&whole)));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let child = std::thread::Builder::new()
            .name(") x (y) z ) w".into())
            .spawn(move || {
                // "PID/task/TID": this thread's own id.
                let link = fs::read_link("/proc/thread-self").unwrap();
                let tid: u32 = link.file_name().unwrap().to_str().unwrap().parse().unwrap();
                tx.send(tid).unwrap();
                let _ = done_rx.recv();
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        let whole = fs::read_to_string(format!("/proc/{tid}/stat")).unwrap();
        assert!(whole.contains(") x (y) z ) w"), "{whole}");
        assert_eq!(facts(stat(tid)), facts(parse_stat(&whole)));
        drop(done_tx);
        child.join().unwrap();
    }
}
