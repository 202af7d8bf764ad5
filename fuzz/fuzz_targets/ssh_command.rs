//! SSH exec commands: parsing never panics, refuses anything over the length cap, and whatever it
//! accepts names a valid repository whose directory stays two plain components under the data
//! dir (no `..`, no absolute path, no option smuggled into git's argv).
#![no_main]

use std::path::Component;

use gitplane_wire::git::repo_name::RepoName;
use gitplane_wire::ssh::command::{parse_exec, ExecRequest, MAX_COMMAND_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_exec(data) else {
        return;
    };
    assert!(data.len() <= MAX_COMMAND_LEN);
    let repo = match &request {
        ExecRequest::Git { repo, .. }
        | ExecRequest::LfsAuthenticate { repo, .. }
        | ExecRequest::LfsTransfer { repo, .. } => repo,
    };
    assert_eq!(RepoName::parse(&repo.to_string()).as_ref(), Ok(repo));
    let dir = repo.relative_dir();
    assert!(dir
        .components()
        .all(|c| matches!(c, Component::Normal(s) if !s.to_string_lossy().starts_with('-'))));
    assert_eq!(dir.components().count(), 2);
});
