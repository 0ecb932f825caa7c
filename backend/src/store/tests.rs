use std::collections::HashMap;

use super::settings::StoreSettings;
use super::transfer::Manifest;
use super::{Location, StoreUrl};

#[test]
fn store_urls_parse_and_print_back() {
    let u = StoreUrl::parse("s3://thaw-images/vms/web-1/").expect("parse");
    assert_eq!(u.bucket, "thaw-images");
    assert_eq!(u.prefix, "vms/web-1");
    assert_eq!(u.to_string(), "s3://thaw-images/vms/web-1");
    assert_eq!(u.object("pages.bin").as_ref(), "vms/web-1/pages.bin");
    for bad in [
        "s3://",
        "s3://bucket",
        "s3://bucket/",
        "s3://Bucket/x",
        "s3://ab/x",
        "s3://-bucket/x",
        "s3://bucket//x",
        "s3://bucket/a/../b",
        "s3://bucket/./b",
        "http://bucket/x",
    ] {
        assert!(StoreUrl::parse(bad).is_err(), "{bad} was accepted");
    }
    assert_eq!(
        Location::parse(std::path::Path::new("/var/lib/img")).expect("local"),
        Location::Local("/var/lib/img".into())
    );
    assert!(matches!(
        Location::parse(std::path::Path::new("s3://bucket/p")).expect("store"),
        Location::Store(_)
    ));
    assert!(Location::parse(std::path::Path::new("s3://B/p")).is_err());
}

fn settings(env: &[(&str, &str)], home: Option<&std::path::Path>) -> Result<StoreSettings, String> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    StoreSettings::resolve(&|k| env.get(k).cloned(), home).map_err(|e| e.to_string())
}

#[test]
fn settings_come_from_the_environment_first_then_the_profile() {
    let home = tempfile::tempdir().expect("tempdir");
    let aws = home.path().join(".aws");
    std::fs::create_dir(&aws).expect("mkdir");
    std::fs::write(
        aws.join("credentials"),
        "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = secret-default\n\
         [ci]\naws_access_key_id=AKCI\naws_secret_access_key=secret-ci\n",
    )
    .expect("write");
    std::fs::write(
        aws.join("config"),
        "[default]\nregion = eu-west-1\n[profile ci]\nregion = eu-north-1\nendpoint_url = http://127.0.0.1:8333\n",
    )
    .expect("write");
    let s = settings(&[], Some(home.path())).expect("default profile");
    assert_eq!(s.access_key_id, "AKDEFAULT");
    assert_eq!(s.region, "eu-west-1");
    assert_eq!(s.endpoint, None);
    let s = settings(&[("AWS_PROFILE", "ci")], Some(home.path())).expect("profile ci");
    assert_eq!(s.access_key_id, "AKCI");
    assert_eq!(s.secret_access_key.expose(), "secret-ci");
    assert_eq!(s.region, "eu-north-1");
    assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
    // The environment wins, key by key.
    let s = settings(
        &[
            ("AWS_PROFILE", "ci"),
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "secret-env"),
            ("AWS_REGION", "ap-south-1"),
            ("AWS_ENDPOINT_URL", "https://store.example:9000"),
        ],
        Some(home.path()),
    )
    .expect("environment");
    assert_eq!(s.access_key_id, "AKENV");
    assert_eq!(s.region, "ap-south-1");
    assert_eq!(s.endpoint.as_deref(), Some("https://store.example:9000"));
    // Secrets never show.
    let shown = format!("{s:?} {}", s.source);
    assert!(!shown.contains("secret-env"), "{shown}");
    assert!(shown.contains("<set>"), "{shown}");
}

#[test]
fn missing_or_half_credentials_are_refused_by_name() {
    let none = settings(&[], None).expect_err("no credentials");
    assert!(none.contains("AWS_ACCESS_KEY_ID"), "{none}");
    let half = settings(&[("AWS_ACCESS_KEY_ID", "AK")], None).expect_err("half");
    assert!(half.contains("together"), "{half}");
    let bad = settings(
        &[
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_ENDPOINT_URL", "127.0.0.1:8333"),
        ],
        None,
    )
    .expect_err("endpoint without a scheme");
    assert!(bad.contains("not an http"), "{bad}");
    assert!(!bad.contains("\"s\""), "{bad}");
}

#[test]
fn a_sibling_is_next_to_the_prefix() {
    let u = StoreUrl::parse("s3://thaw-images/vms/web-1/child").expect("parse");
    assert_eq!(
        u.sibling("base").to_string(),
        "s3://thaw-images/vms/web-1/base"
    );
    let top = StoreUrl::parse("s3://thaw-images/child").expect("parse");
    assert_eq!(top.sibling("base").to_string(), "s3://thaw-images/base");
}

#[test]
fn manifests_name_plain_files_once_and_a_meta_json() {
    let good = br#"{"manifest_version":1,"identity":"00ff","files":[
        {"name":"meta.json","len":10,"xxh3":"0"},{"name":"pages.bin","len":4096,"xxh3":"1"}]}"#;
    assert_eq!(Manifest::parse(good).expect("good").files.len(), 2);
    let child = br#"{"manifest_version":1,"identity":"00ff","files":[
        {"name":"meta.json","len":10,"xxh3":"0"}],
        "parent":{"url":"s3://thaw-images/vms/base","identity":"0a"}}"#;
    let parent = Manifest::parse(child)
        .expect("child")
        .parent
        .expect("parent");
    assert_eq!(parent.url, "s3://thaw-images/vms/base");
    for bad in [
        r#"{"manifest_version":1,"identity":"0","files":[{"name":"meta.json","len":1,"xxh3":"0"}],"parent":{"url":"/local/base","identity":"0a"}}"#,
        r#"{"manifest_version":1,"identity":"0","files":[{"name":"meta.json","len":1,"xxh3":"0"}],"parent":{"url":"s3://b0/base","identity":""}}"#,
        r#"{"manifest_version":3,"identity":"0","files":[{"name":"meta.json","len":1,"xxh3":"0"}]}"#,
        r#"{"manifest_version":1,"identity":"0","files":[{"name":"../meta.json","len":1,"xxh3":"0"}]}"#,
        r#"{"manifest_version":1,"identity":"0","files":[{"name":"a/b","len":1,"xxh3":"0"},{"name":"meta.json","len":1,"xxh3":"0"}]}"#,
        r#"{"manifest_version":1,"identity":"0","files":[{"name":"meta.json","len":1,"xxh3":"0"},{"name":"meta.json","len":1,"xxh3":"0"}]}"#,
        r#"{"manifest_version":1,"identity":"0","files":[{"name":"pages.bin","len":1,"xxh3":"0"}]}"#,
        r#"{"manifest_version":1,"identity":"0","files":[{"name":"thaw-image.json","len":1,"xxh3":"0"},{"name":"meta.json","len":1,"xxh3":"0"}]}"#,
        r#"{"manifest_version":1,"identity":"0","files":[],"extra":1}"#,
    ] {
        assert!(
            Manifest::parse(bad.as_bytes()).is_err(),
            "{bad} was accepted"
        );
    }
}

#[test]
fn a_restore_from_a_store_fetches_only_the_working_sets_it_uses() {
    use super::lazy::WorkingSets;
    use crate::ops::restore::{EstimatorChoice, Mode};
    let lazy = WorkingSets::for_restore(Mode::Lazy, EstimatorChoice::None, false);
    for name in ["meta.json", "index.bin", "device.state", "ws-evidence.json"] {
        assert!(lazy.wants(name), "{name}");
    }
    assert!(!lazy.wants("pages.bin") && !lazy.wants("ws-learned.bin"));
    // A restore that learns refines the learned set it fetches.
    let learning = WorkingSets::for_restore(Mode::Lazy, EstimatorChoice::None, true);
    assert!(learning.wants("ws-learned.bin") && !learning.wants("ws-trace.bin"));
    let trace = WorkingSets::for_restore(Mode::Ws, EstimatorChoice::Trace, false);
    assert!(trace.wants("ws-trace.bin") && !trace.wants("ws-learned.bin"));
    // `auto` chooses by the image's evidence among all of them.
    let auto = WorkingSets::for_restore(Mode::Ws, EstimatorChoice::Auto, false);
    for e in ["learned", "trace", "abit", "dirty"] {
        assert!(auto.wants(&format!("ws-{e}.bin")), "{e}");
    }
    assert!(!auto.wants("pages.bin"));
}

#[test]
fn published_working_sets_are_named_apart_and_nothing_else_is() {
    let v = super::publish::versioned("ws-learned.bin", "0123456789abcdef");
    assert_eq!(v, "ws-learned.bin.v-0123456789abcdef");
    let good = format!(
        r#"{{"manifest_version":2,"identity":"00ff","files":[
        {{"name":"meta.json","len":10,"xxh3":"0"}},
        {{"name":"ws-learned.bin","len":8192,"xxh3":"0123456789abcdef","object":"{v}"}}]}}"#
    );
    let m = Manifest::parse(good.as_bytes()).expect("a published set");
    assert_eq!(m.files[1].object_name(), v);
    assert_eq!(m.files[0].object_name(), "meta.json");
    for bad in [
        // Only working sets and their evidence live apart.
        r#"{"manifest_version":2,"identity":"0","files":[{"name":"meta.json","len":1,"xxh3":"0"},{"name":"pages.bin","len":1,"xxh3":"0","object":"pages.bin.v-0123456789abcdef"}]}"#,
        // Two files in one object.
        r#"{"manifest_version":2,"identity":"0","files":[{"name":"meta.json","len":1,"xxh3":"0"},{"name":"ws-trace.bin","len":1,"xxh3":"0","object":"meta.json"}]}"#,
        r#"{"manifest_version":2,"identity":"0","files":[{"name":"meta.json","len":1,"xxh3":"0"},{"name":"ws-trace.bin","len":1,"xxh3":"0","object":"../x"}]}"#,
        r#"{"manifest_version":2,"identity":"0","files":[{"name":"meta.json","len":1,"xxh3":"0"},{"name":"ws-trace.bin","len":1,"xxh3":"0","object":"thaw-image.json"}]}"#,
        // A file apart in a manifest of version 1, as pushed.
        r#"{"manifest_version":1,"identity":"0","files":[{"name":"meta.json","len":1,"xxh3":"0"},{"name":"ws-trace.bin","len":1,"xxh3":"0","object":"ws-trace.bin.v-0123456789abcdef"}]}"#,
    ] {
        assert!(
            Manifest::parse(bad.as_bytes()).is_err(),
            "{bad} was accepted"
        );
    }
}

#[test]
fn a_publish_removes_only_versions_neither_manifest_names() {
    use super::publish::{superseded, versioned};
    use super::transfer::{ManifestFile, MANIFEST, MANIFEST_VERSION};
    let file = |name: &str, xxh3: &str, published: bool| ManifestFile {
        name: name.into(),
        len: 4096,
        xxh3: xxh3.into(),
        object: published.then(|| versioned(name, xxh3)),
    };
    let manifest = |files: Vec<ManifestFile>| Manifest {
        manifest_version: MANIFEST_VERSION,
        identity: "00ff".into(),
        files,
        parent: None,
    };
    let (a, b, c) = ("000000000000000a", "000000000000000b", "000000000000000c");
    let fixed = || vec![file("meta.json", "1", false), file("pages.bin", "2", false)];
    // As pushed: the learned set in its plain object.
    let pushed = manifest([fixed(), vec![file("ws-learned.bin", a, false)]].concat());
    let first = manifest([fixed(), vec![file("ws-learned.bin", b, true)]].concat());
    let second = manifest([fixed(), vec![file("ws-learned.bin", c, true)]].concat());
    let old = super::publish::RECENT * 2;
    let present = |names: &[&str]| -> Vec<(String, std::time::Duration)> {
        names
            .iter()
            .map(|n| n.to_string())
            .chain([MANIFEST.to_string()])
            .map(|n| (n, old))
            .collect()
    };
    // The first publish keeps the plain object: the old manifest names it.
    let all = present(&[
        "meta.json",
        "pages.bin",
        "ws-learned.bin",
        &versioned("ws-learned.bin", b),
    ]);
    assert!(superseded(&all, &pushed, old, &first).is_empty());
    // The second removes it, keeps the first version for readers of the
    // manifest before, and never touches what it does not know: a
    // leftover of another kind, a foreign object.
    let all = present(&[
        "meta.json",
        "pages.bin",
        "ws-learned.bin",
        "notes.txt",
        &versioned("ws-learned.bin", b),
        &versioned("ws-learned.bin", c),
        &versioned("ws-trace.bin", a),
        "pages.bin.v-000000000000000a",
    ]);
    let mut gone = superseded(&all, &first, old, &second);
    gone.sort();
    // Nothing while a restore may still read the manifest before.
    let just_written = std::time::Duration::from_secs(60);
    assert!(superseded(&all, &first, just_written, &second).is_empty());
    // A version uploaded a moment ago may be another publish's, its
    // manifest not written yet.
    let mut young = all.clone();
    young
        .iter_mut()
        .filter(|(n, _)| n.starts_with("ws-trace"))
        .for_each(|(_, age)| *age = std::time::Duration::from_secs(1));
    assert_eq!(
        superseded(&young, &first, old, &second),
        vec!["ws-learned.bin".to_string()]
    );
    assert_eq!(
        gone,
        vec!["ws-learned.bin".to_string(), versioned("ws-trace.bin", a),]
    );
}
