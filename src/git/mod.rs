//! Everything git-facing that every front end shares: repository names and paths, the pkt-line
//! codec, spawning `git` service processes, the pack concurrency limiter, the pack-objects cache
//! and its counters, relaying git to another node of a cluster, streaming a child's output to a
//! socket with splice, and the protocol v2 answers given without git.

pub mod child;
pub mod limiter;
pub mod pack_cache;
pub mod pack_cache_stats;
pub mod process;
pub mod relay;
pub mod relay_cache;
pub mod repo;
pub mod spawn;
pub mod splice;
pub mod stream;
pub mod tokio_child;
pub mod v2;

pub use gitplane_wire::git::{pktline, repo_name};

/// Quotes `s` as one word for `/bin/sh` (git runs hook settings and our hook scripts through it).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(super::shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(super::shell_quote("it's"), r"'it'\''s'");
    }
}
