//! The device's archive check: every kind of entry the builder never
//! produces is refused, naming the entry; hostile tars never panic it.

use perch_protocol::bundle::{check_archive, raw_entry as entry, ArchiveError, ArchivePolicy, Refusal};
use proptest::prelude::*;

fn end(mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(&[0; 1024]);
    out
}

fn refusal(tar: &[u8], policy: ArchivePolicy) -> (String, Refusal) {
    match check_archive(tar, policy) {
        Err(ArchiveError::Refused { entry, reason }) => (entry, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const NONE: ArchivePolicy = ArchivePolicy { allow_setid: false };

/// A tree the builder could have made: dir, files, symlink, hardlink.
fn good() -> Vec<u8> {
    let mut t = Vec::new();
    entry(&mut t, b"etc/", b'5', 0o700, b"", b"");
    entry(&mut t, b"etc/key", b'0', 0o600, b"", b"secret");
    entry(&mut t, b"bin", b'0', 0o755, b"", b"#!/bin/sh\n");
    entry(&mut t, b"run", b'2', 0o777, b"/usr/bin/env", b"");
    entry(&mut t, b"bin2", b'1', 0o755, b"bin", b"");
    t
}

#[test]
fn what_the_builder_makes_is_accepted() {
    assert_eq!(check_archive(&end(good())[..], NONE).unwrap(), 5);
}

#[test]
fn device_nodes_and_fifos_are_refused_by_name() {
    for (kind, what) in [(b'3', "character device"), (b'4', "block device"), (b'6', "FIFO")] {
        let mut t = good();
        entry(&mut t, b"dev-thing", kind, 0o600, b"", b"");
        let (name, why) = refusal(&end(t), NONE);
        assert_eq!(name, "dev-thing");
        assert_eq!(why, Refusal::EntryType(what.into()));
    }
}

#[test]
fn dot_dot_and_absolute_paths_are_refused() {
    for (path, why) in [
        (&b"../evil"[..], Refusal::Component("..".into())),
        (b"etc/../../evil", Refusal::Component("..".into())),
        (b"/etc/passwd", Refusal::Absolute),
        (b"./x", Refusal::Component(".".into())),
        (b"etc//x", Refusal::Component("".into())),
    ] {
        let mut t = good();
        entry(&mut t, path, b'0', 0o644, b"", b"x");
        assert_eq!(refusal(&end(t), NONE), (String::from_utf8(path.to_vec()).unwrap(), why));
    }
}

/// A pax extended header record `LEN key=value\n`.
fn pax(key: &str, value: &[u8]) -> Vec<u8> {
    let body = [format!(" {key}=").as_bytes(), value, b"\n"].concat();
    let mut len = body.len() + 1;
    while format!("{len}").len() + body.len() != len {
        len += 1;
    }
    [format!("{len}").as_bytes(), &body[..]].concat()
}

/// [`entry`] with a GNU header, the only kind whose `L`/`K`/`x` entries
/// tar readers take as long names or pax records.
fn gnu_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, mode: u32, link: &[u8], data: &[u8]) {
    let at = out.len();
    entry(out, name, kind, mode, link, data);
    let mut h = tar::Header::new_gnu();
    h.as_mut_bytes().copy_from_slice(&out[at..at + 512]);
    h.as_mut_bytes()[257..265].copy_from_slice(b"ustar  \0");
    h.set_cksum();
    out[at..at + 512].copy_from_slice(h.as_bytes());
}

#[test]
fn nul_bytes_in_long_names_and_link_targets_are_refused() {
    // GNU long name: the path is `etc\0x` although the header says `placeholder`.
    let mut t = good();
    gnu_entry(&mut t, b"././@LongLink", b'L', 0o644, b"", b"etc\0x\0");
    gnu_entry(&mut t, b"placeholder", b'0', 0o644, b"", b"x");
    assert_eq!(refusal(&end(t), NONE), ("etc\\0x".into(), Refusal::Nul));
    // pax path.
    let mut t = good();
    gnu_entry(&mut t, b"PaxHeader", b'x', 0o644, b"", &pax("path", b"a\0b"));
    gnu_entry(&mut t, b"placeholder", b'0', 0o644, b"", b"x");
    assert_eq!(refusal(&end(t), NONE), ("a\\0b".into(), Refusal::Nul));
    // GNU long link name on a symlink.
    let mut t = good();
    gnu_entry(&mut t, b"././@LongLink", b'K', 0o644, b"", b"/etc\0/x\0");
    gnu_entry(&mut t, b"lnk", b'2', 0o777, b"placeholder", b"");
    assert_eq!(refusal(&end(t), NONE), ("lnk".into(), Refusal::Nul));
}

#[test]
fn setid_needs_the_signed_option() {
    for mode in [0o4755, 0o2755] {
        let mut t = good();
        entry(&mut t, b"su", b'0', mode, b"", b"x");
        let t = end(t);
        assert_eq!(refusal(&t, NONE), ("su".into(), Refusal::Setid(mode)));
        assert!(check_archive(&t[..], ArchivePolicy { allow_setid: true }).is_ok());
    }
}

#[test]
fn world_writable_entries_are_refused() {
    let mut t = good();
    entry(&mut t, b"tmp/", b'5', 0o1777, b"", b"");
    assert_eq!(refusal(&end(t), NONE), ("tmp/".into(), Refusal::WorldWritable(0o1777)));
    let mut t = good();
    entry(&mut t, b"etc/open", b'0', 0o666, b"", b"x");
    assert_eq!(refusal(&end(t), NONE), ("etc/open".into(), Refusal::WorldWritable(0o666)));
}

#[test]
fn writes_through_a_symlink_are_refused() {
    let mut t = good();
    entry(&mut t, b"run/x", b'0', 0o644, b"", b"x");
    assert_eq!(refusal(&end(t), NONE), ("run/x".into(), Refusal::Parent("run".into())));
    // Parents must come first: no implied directories.
    let mut t = good();
    entry(&mut t, b"new/x", b'0', 0o644, b"", b"x");
    assert_eq!(refusal(&end(t), NONE), ("new/x".into(), Refusal::Parent("new".into())));
}

#[test]
fn duplicates_and_overwrites_are_refused() {
    let mut t = good();
    entry(&mut t, b"bin", b'0', 0o755, b"", b"other");
    assert_eq!(refusal(&end(t), NONE), ("bin".into(), Refusal::Duplicate));
    // A file replaced by a symlink of the same name.
    let mut t = good();
    entry(&mut t, b"etc/key", b'2', 0o777, b"/etc/shadow", b"");
    assert_eq!(refusal(&end(t), NONE), ("etc/key".into(), Refusal::Duplicate));
    // A directory given twice (once with, once without the slash).
    let mut t = good();
    entry(&mut t, b"etc", b'5', 0o755, b"", b"");
    assert_eq!(refusal(&end(t), NONE), ("etc".into(), Refusal::Duplicate));
}

#[test]
fn hardlinks_must_name_an_earlier_file_in_the_tree() {
    for (target, why) in [
        (&b"/etc/shadow"[..], Refusal::LinkTarget("/etc/shadow".into())),
        (b"../outside", Refusal::LinkTarget("../outside".into())),
        (b"etc", Refusal::LinkTarget("etc".into())),
        (b"run", Refusal::LinkTarget("run".into())),
        (b"later", Refusal::LinkTarget("later".into())),
    ] {
        let mut t = good();
        entry(&mut t, b"link", b'1', 0o644, target, b"");
        entry(&mut t, b"later", b'0', 0o644, b"", b"x");
        assert_eq!(refusal(&end(t), NONE), ("link".into(), why));
    }
}

#[test]
fn data_on_a_directory_or_link_is_refused() {
    let mut t = good();
    entry(&mut t, b"d/", b'5', 0o755, b"", b"hidden");
    assert_eq!(refusal(&end(t), NONE), ("d/".into(), Refusal::Data("directory".into(), 6)));
}

#[test]
fn entries_hidden_after_the_end_marker_are_refused() {
    // `tar --ignore-zeros` would unpack this second entry.
    let mut t = end(good());
    entry(&mut t, b"hidden", b'0', 0o644, b"", b"x");
    let e = check_archive(&t[..], NONE).unwrap_err();
    assert!(e.to_string().contains("data after the end of the archive"), "{e}");
    // Zero padding (tar pads to whole records) is fine.
    let mut t = end(good());
    t.extend_from_slice(&[0; 10240]);
    assert!(check_archive(&t[..], NONE).is_ok());
}

#[test]
fn a_corrupt_header_is_malformed_not_io() {
    let mut t = end(good());
    t[148] ^= 0x55; // the first header's checksum
    let e = check_archive(&t[..], NONE).unwrap_err();
    assert!(matches!(e, ArchiveError::Malformed(_)), "{e}");
    assert!(e.is_security());
}

#[test]
fn a_read_failure_is_io_not_a_refusal() {
    struct Failing;
    impl std::io::Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    let e = check_archive(Failing, NONE).unwrap_err();
    assert!(matches!(e, ArchiveError::Io(_)), "{e}");
    assert!(!e.is_security());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Random entries (names from a small alphabet with `/`, `.`, and
    /// every type byte): the check never panics, and whatever it accepts
    /// keeps the invariants the unpacker relies on.
    #[test]
    fn hostile_tars_never_panic_and_accepted_ones_are_tame(
        entries in prop::collection::vec(
            (prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'/', b'.', 0]), 1..12),
             prop::sample::select(vec![b'0', b'1', b'2', b'3', b'4', b'5', b'6', b'7', b'g', b'x', b'L', b'K']),
             prop::sample::select(vec![0o644u32, 0o4755, 0o777, 0o1777, 0o700, 0o170644]),
             prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'/', b'.', 0]), 0..8),
             prop::collection::vec(prop::sample::select(vec![b'a', b'/', b'.', 0]), 0..6),
             any::<bool>()),
            0..12),
        allow_setid: bool,
    ) {
        let mut t = Vec::new();
        for (name, kind, mode, link, data, gnu) in &entries {
            // Data doubles as a GNU long name (`L`, `K`) or pax body (`x`).
            let add = if *gnu { gnu_entry } else { entry };
            add(&mut t, name, *kind, *mode, link, data);
        }
        let t = end(t);
        let policy = ArchivePolicy { allow_setid };
        if check_archive(&t[..], policy).is_ok() {
            let mut ar = tar::Archive::new(&t[..]);
            for e in ar.entries().unwrap() {
                let e = e.unwrap();
                let path = e.path_bytes().into_owned();
                prop_assert!(!path.contains(&0));
                if let Some(target) = e.link_name_bytes() {
                    prop_assert!(!target.contains(&0));
                }
                prop_assert!(!path.starts_with(b"/"));
                prop_assert!(!path.split(|b| *b == b'/').any(|c| c == b".."));
                let kind = e.header().entry_type();
                prop_assert!(kind.is_file() || kind.is_dir() || kind.is_symlink() || kind.is_hard_link());
                if !kind.is_symlink() && !kind.is_hard_link() {
                    let mode = e.header().mode().unwrap();
                    prop_assert_eq!(mode & 0o002, 0);
                    prop_assert!(allow_setid || mode & 0o6000 == 0);
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = check_archive(&data[..], ArchivePolicy { allow_setid: true });
    }
}
