//! LFS Batch API JSON: parsing any body never panics, and every object of a parsed request gets
//! exactly one answer: actions or an error, never both, and hrefs only for valid object ids.
#![no_main]

use std::collections::BTreeMap;

use gitplane_wire::lfs::api::{answer, check_request, valid_oid, ActionContext, BatchRequest, Known};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<BatchRequest>(data) else {
        return;
    };
    let _ = check_request(&req, 1000);
    let header = BTreeMap::new();
    let ctx = ActionContext {
        base: "http://h/o/r.git/info/lfs",
        header: &header,
        expires_in: 60,
        expires_at: "2026-01-01T00:00:00Z",
        max_object_size: 1 << 40,
    };
    for (i, spec) in req.objects.iter().enumerate() {
        let known = Known {
            stored_size: (i % 2 == 0).then_some(spec.size.unsigned_abs()),
            linked: i % 3 == 0,
        };
        let a = answer(req.operation, spec, known, &ctx);
        assert!(a.actions.is_none() || a.error.is_none());
        if a.actions.is_some() {
            assert!(valid_oid(&spec.oid));
        }
    }
});
