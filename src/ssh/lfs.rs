//! The answer to `git-lfs-authenticate OWNER/NAME upload|download` (sans-I/O): the JSON that
//! git-lfs reads to find the HTTP LFS endpoint and the header to send there.
//!
//! ```json
//! {"href": "http://HOST:PORT/OWNER/NAME.git/info/lfs",
//!  "header": {"Authorization": "Bearer gpl1...."},
//!  "expires_in": 600}
//! ```

use std::net::SocketAddr;

use crate::git::repo_name::RepoName;

/// The LFS endpoint of `repo` on the HTTP listener at `http`.
pub fn lfs_href(http: SocketAddr, repo: &RepoName) -> String {
    format!(
        "http://{http}/{}/{}.git/info/lfs",
        repo.owner(),
        repo.name()
    )
}

/// The JSON body `git-lfs-authenticate` prints (with a trailing newline).
pub fn authenticate_response(href: &str, token: &str, expires_in_secs: u64) -> String {
    let body = serde_json::json!({
        "href": href,
        "header": { "Authorization": format!("Bearer {token}") },
        "expires_in": expires_in_secs,
    });
    format!("{body}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_shape() {
        let repo = RepoName::parse("alice/proj.git").unwrap();
        let href = lfs_href("127.0.0.1:8080".parse().unwrap(), &repo);
        assert_eq!(href, "http://127.0.0.1:8080/alice/proj.git/info/lfs");
        let v6 = lfs_href("[::1]:80".parse().unwrap(), &repo);
        assert_eq!(v6, "http://[::1]:80/alice/proj.git/info/lfs");
        let text = authenticate_response(&href, "gpl1.x", 600);
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["href"], href);
        assert_eq!(v["header"]["Authorization"], "Bearer gpl1.x");
        assert_eq!(v["expires_in"], 600);
    }
}
