#![no_main]
//! Arbitrary bytes as an archive payload: the device's archive check must
//! never panic, and whatever it accepts holds only relative, normal paths of
//! the allowed entry types, nothing world-writable, and no setid bits
//! unless the policy allows them.
use libfuzzer_sys::fuzz_target;
use perch_protocol::bundle::{check_archive, ArchivePolicy};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, tar)) = data.split_first() else { return };
    let policy = ArchivePolicy { allow_setid: flags & 1 == 1 };
    if check_archive(tar, policy).is_err() {
        return;
    }
    let mut ar = tar::Archive::new(tar);
    for e in ar.entries().expect("accepted archive re-reads") {
        let e = e.expect("accepted entry re-reads");
        let path = e.path_bytes().into_owned();
        assert!(!path.starts_with(b"/"));
        assert!(!path.split(|b| *b == b'/').any(|c| c == b".." || c == b"."));
        let kind = e.header().entry_type();
        assert!(kind.is_file() || kind.is_dir() || kind.is_symlink() || kind.is_hard_link());
        if kind.is_file() || kind.is_dir() {
            let mode = e.header().mode().expect("accepted mode parses");
            assert_eq!(mode & 0o002, 0);
            assert!(policy.allow_setid || mode & 0o6000 == 0);
        }
    }
});
