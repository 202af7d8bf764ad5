//! Repository names: parsing never panics, and an accepted name round-trips through its display
//! form and its directory, which is always two plain path components.
#![no_main]

use std::path::Component;

use gitplane_wire::git::repo_name::RepoName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(name) = RepoName::parse(s) else {
        return;
    };
    assert_eq!(RepoName::parse(&name.to_string()), Ok(name.clone()));
    let dir = name.relative_dir();
    let components: Vec<_> = dir.components().collect();
    assert_eq!(components.len(), 2);
    assert!(components.iter().all(|c| matches!(c, Component::Normal(_))));
    assert_eq!(RepoName::parse(dir.to_str().unwrap()), Ok(name));
});
