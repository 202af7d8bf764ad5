//! Per-repository counters, updated by every push event and reset (by what they counted) when
//! maintenance runs. Kept in `gitplane-housekeeping` inside the repository, so they move with it;
//! git ignores unknown files in a git directory. Every update holds an exclusive `flock` on the
//! file, so the server's workers and `gitplane repo maintain` never lose each other's counts.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

const FILE: &str = "gitplane-housekeeping";

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub pushes_since_run: u64,
    pub pushes_since_full: u64,
    pub pushes_since_graph: u64,
    pub pushes_since_repack: u64,
    /// Unix seconds of the last run and the last full repack (0 = never).
    pub last_run: u64,
    pub last_full: u64,
}

impl State {
    fn parse(text: &str) -> Self {
        let mut s = State::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(' ') else {
                continue;
            };
            let Ok(v) = v.trim().parse() else { continue };
            match k {
                "pushes_since_run" => s.pushes_since_run = v,
                "pushes_since_full" => s.pushes_since_full = v,
                "pushes_since_graph" => s.pushes_since_graph = v,
                "pushes_since_repack" => s.pushes_since_repack = v,
                "last_run" => s.last_run = v,
                "last_full" => s.last_full = v,
                _ => {}
            }
        }
        s
    }

    fn render(&self) -> String {
        format!(
            "pushes_since_run {}\npushes_since_full {}\npushes_since_graph {}\npushes_since_repack {}\nlast_run {}\nlast_full {}\n",
            self.pushes_since_run, self.pushes_since_full, self.pushes_since_graph, self.pushes_since_repack, self.last_run, self.last_full
        )
    }
}

/// Reads the state of `repo` (all zero if never written).
pub fn read(repo: &Path) -> io::Result<State> {
    update(repo, |_| {})
}

/// Applies `f` to the state of `repo` under the file's lock and writes it back; returns the new
/// state.
pub fn update(repo: &Path, f: impl FnOnce(&mut State)) -> io::Result<State> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(repo.join(FILE))?;
    let _lock = Flock::exclusive(&file)?;
    let mut io = &file;
    let mut text = String::new();
    io.read_to_string(&mut text)?;
    let before = State::parse(&text);
    let mut state = before;
    f(&mut state);
    if state != before {
        file.set_len(0)?;
        io.rewind()?;
        io.write_all(state.render().as_bytes())?;
    }
    Ok(state)
}

/// An exclusive `flock` held until dropped.
pub struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    /// Waits for the lock.
    pub fn exclusive(file: &'a File) -> io::Result<Self> {
        Self::take(file, libc::LOCK_EX).map(|l| l.expect("a blocking flock always ends locked"))
    }

    /// None if another holder has it.
    pub fn try_exclusive(file: &'a File) -> io::Result<Option<Self>> {
        Self::take(file, libc::LOCK_EX | libc::LOCK_NB)
    }

    fn take(file: &'a File, op: libc::c_int) -> io::Result<Option<Self>> {
        loop {
            // SAFETY: flock on an fd the File keeps open.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(Some(Self(file)));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(None),
                _ => return Err(e),
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), State::default());
        update(dir.path(), |s| s.pushes_since_run += 3).unwrap();
        let s = update(dir.path(), |s| s.last_full = 17).unwrap();
        assert_eq!(s.pushes_since_run, 3);
        assert_eq!(read(dir.path()).unwrap(), s);
        assert_eq!(State::parse("bogus\nlast_run x\nlast_run 5\n").last_run, 5);
    }
}
