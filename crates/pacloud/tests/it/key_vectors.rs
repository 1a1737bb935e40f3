//! The test vectors of docs/key.md, checked three ways: the canonical bytes
//! and key from the domain crate, the key from `pacloud key`-equivalent
//! validation with the doc's own target definitions, and the key the live
//! server answers with.

use crate::helpers::*;
use pacloud::settings::Settings;
use pacloud_domain::BuildKey;
use pacloud_domain::request::BuildRequest;
use serde_json::Value;

struct Vector {
    request: Value,
    canonical: String,
    key: String,
}

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/key.md")).expect("docs/key.md")
}

fn vectors(doc: &str) -> Vec<Vector> {
    doc.split("```vector\n")
        .skip(1)
        .map(|block| {
            let block = block.split("```").next().unwrap();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .unwrap_or_else(|| panic!("{name} in {block}"))
                    .to_owned()
            };
            Vector {
                request: serde_json::from_str(&field("request")).unwrap(),
                canonical: serde_json::from_str(&field("canonical")).unwrap(),
                key: field("key"),
            }
        })
        .collect()
}

/// The settings the doc's ```toml block defines (the `fixtures` target).
fn doc_settings(doc: &str, dir: &std::path::Path) -> Settings {
    let toml = doc.split("```toml\n").nth(1).unwrap().split("```").next().unwrap();
    let file = dir.join("targets.toml");
    std::fs::write(&file, toml).unwrap();
    Settings::load(Some(&file), |_| None).expect("the doc's target block is a valid settings file")
}

pub(crate) fn request(v: &Value) -> BuildRequest {
    BuildRequest {
        atom: v["atom"].as_str().unwrap().into(),
        version: v["version"].as_str().unwrap().into(),
        use_flags: v["use"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_owned()).collect(),
        target: v.get("target").and_then(|t| t.as_str()).map(Into::into),
    }
}

#[test]
fn doc_vectors_match_the_implementation() {
    let doc = doc();
    let dir = tempfile::tempdir().unwrap();
    let settings = doc_settings(&doc, dir.path());
    let vs = vectors(&doc);
    assert!(vs.len() >= 10, "at least 10 vectors, found {}", vs.len());
    for v in &vs {
        let spec = request(&v.request).validate(&settings.targets).unwrap_or_else(|e| panic!("{}: {e}", v.request));
        let bytes = BuildKey::canonical_encoding(&spec.target_hash, &spec.atom, &spec.version, &spec.use_flags);
        assert_eq!(String::from_utf8(bytes).unwrap(), v.canonical, "canonical bytes of {}", v.request);
        assert_eq!(spec.key().as_str(), v.key, "key of {}", v.request);
    }
    let t = settings.targets.get(&"default".parse().unwrap()).unwrap();
    assert!(doc.contains(&format!("hash `{}`", t.hash())), "the doc states the default target's hash");
    let f = settings.targets.get(&"fixtures".parse().unwrap()).unwrap();
    assert!(doc.contains(&format!("hash `{}`", f.hash())), "the doc states the fixtures target's hash");
}

#[tokio::test]
async fn server_answers_with_the_doc_keys() {
    let doc = doc();
    let dir = tempfile::tempdir().unwrap();
    let targets = doc_settings(&doc, dir.path()).targets;
    let app = spawn_app_with(|s| s.targets = targets).await;
    for v in vectors(&doc) {
        let (status, body) = app.post_build(&v.request).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["key"], v.key.as_str(), "server key of {}", v.request);
    }
}

/// The version 2 vectors: the doc's index entry applied to the request by
/// the domain crate gives the doc's canonical bytes and key, or its refusal.
#[test]
fn doc_v2_vectors_match_the_implementation() {
    use pacloud_domain::KeyVersion;
    use pacloud_domain::tree::{Cpv, PackageUse, UseRefusal};
    let doc = doc();
    let dir = tempfile::tempdir().unwrap();
    let settings = doc_settings(&doc, dir.path());
    let blocks: Vec<&str> = doc.split("```vector-v2\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    assert!(blocks.len() >= 8, "at least 8 version 2 vectors, found {}", blocks.len());
    let (mut keys, mut refusals) = (0, 0);
    for block in blocks {
        let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).map(str::to_owned);
        let request: Value = serde_json::from_str(&field("request").unwrap()).unwrap();
        let pkg: PackageUse = serde_json::from_str(&field("index").unwrap()).unwrap();
        let spec = super::key_vectors::request(&request).validate(&settings.targets).unwrap();
        let result = pkg.effective(&Cpv(&spec.atom, &spec.version), &spec.use_flags);
        match (field("canonical"), field("refused")) {
            (Some(canonical), None) => {
                let eff = result.unwrap_or_else(|e| panic!("{request}: {e}"));
                let canonical: String = serde_json::from_str(&canonical).unwrap();
                let bytes =
                    BuildKey::canonical_encoding_of(KeyVersion::V2, &spec.target_hash, &spec.atom, &spec.version, &eff);
                assert_eq!(String::from_utf8(bytes).unwrap(), canonical, "canonical bytes of {request}");
                let key = BuildKey::compute_of(KeyVersion::V2, &spec.target_hash, &spec.atom, &spec.version, &eff);
                assert_eq!(key.as_str(), field("key").unwrap(), "key of {request}");
                keys += 1;
            }
            (None, Some(refused)) => {
                let (rule, flag) = refused.split_once(' ').unwrap();
                let e = result.expect_err(&refused);
                let got = match &e {
                    UseRefusal::NotInIuse { .. } => "iuse",
                    UseRefusal::Masked { .. } => "use.mask",
                    UseRefusal::Forced { .. } => "use.force",
                };
                assert_eq!((got, e.flag()), (rule, flag), "{request}");
                refusals += 1;
            }
            other => panic!("a vector has a key or a refusal: {other:?}"),
        }
    }
    assert!(keys >= 5 && refusals >= 3, "{keys} keys, {refusals} refusals");
}
