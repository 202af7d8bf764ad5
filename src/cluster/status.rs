//! `gitplane cluster status`: the nodes as the shared store sees them, and the repositories whose
//! replicas disagree (an outdated copy waiting for repair, or a node that is down).

use std::fmt::Write;

use super::ClusterError;
use crate::store::{Location, Store};

pub fn render(location: &Location) -> Result<String, ClusterError> {
    let store = Store::open(location)?;
    let nodes = store.cluster_nodes()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<6} {:>16} {:>9}  {:<22} {:<22} ssh",
        "node", "state", "last heartbeat", "replicas", "cluster", "http"
    );
    for n in &nodes {
        let state = match (n.is_up(), n.draining) {
            (true, false) => "up",
            (true, true) => "drain",
            (false, _) => "DOWN",
        };
        let _ = writeln!(
            out,
            "{:<16} {:<6} {:>14.1} s {:>9}  {:<22} {:<22} {}",
            n.id,
            state,
            n.silent_ms as f64 / 1000.0,
            n.replicas,
            n.cluster_addr,
            n.http_addr,
            n.ssh_addr
        );
    }
    let disagreeing = store.disagreeing()?;
    if disagreeing.is_empty() {
        let _ = writeln!(out, "\nevery repository's replicas agree");
    } else {
        let _ = writeln!(out, "\nrepositories whose replicas disagree:");
        for (repo, r) in disagreeing {
            let copies: Vec<String> = r
                .replicas
                .iter()
                .map(|c| {
                    let tag = if c.generation == r.generation {
                        ""
                    } else {
                        " (outdated)"
                    };
                    format!("{} {}{tag}", c.node, c.generation)
                })
                .collect();
            let _ = writeln!(
                out,
                "  {repo} at generation {}: {}",
                r.generation,
                copies.join(", ")
            );
        }
    }
    Ok(out)
}
