//! Crash injection: SIGKILL the real agent at every failpoint of an install,
//! through staging, activation and trial, then start it again, and check
//! what the device is left with after every single kill.
//!
//! After every kill and restart:
//! - the slot the firmware will boot holds a complete, hash-identical copy of
//!   the old or the new payload, never a mix;
//! - the journal loads and ends consistent (committed, at the end);
//! - a resumed staging never rewrites a chunk the journal had recorded.

use std::collections::BTreeSet;
use std::fs;

use perch_tests::device::{old_image, tree_digest, Backend, Device, SLOT_SIZE};

const LEN: usize = 512 * 1024;
const CHUNK: u32 = 4096;

fn killed(r: &perch_tests::Run) -> bool {
    r.code == -1
}

fn writes(path: &std::path::Path) -> Vec<u32> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("write ").and_then(|n| n.parse().ok()))
        .collect()
}

/// The firmware's next slot holds all of the old image or all of the new payload.
fn check_block_slots(d: &Device, new: &[u8], when: &str) {
    let next = d.firmware_next();
    match next.as_str() {
        "a" => assert_eq!(d.slot_bytes("a", SLOT_SIZE), old_image(), "{when}: slot a damaged"),
        "b" => assert_eq!(d.slot_bytes("b", LEN), new, "{when}: firmware points at an incomplete slot b"),
        other => panic!("{when}: firmware points at '{other}'"),
    }
    let st = d.status();
    assert!(st["journal_problem"].is_null(), "{when}: {st}");
}

#[test]
fn uboot_install_survives_sigkill_at_every_point() {
    let mut d = Device::new(Backend::Uboot);
    // Hundreds of reboots: the boot script's model (tests/uboot.rs checks it).
    d.boot_model = true;
    d.checkpoint_bytes = 16 * 1024;
    d.write_config();
    let new = d.image_bundle("v2.perch", 2, 7, LEN, CHUNK);
    d.snapshot();
    let mut points = 0;
    let mut staging_points = 0;
    let mut resumed_skips = 0u64;
    // Phase 1: kills during `install` (staging and activation).
    for n in 1.. {
        d.restore();
        let trace1 = d.path("trace1");
        let trace2 = d.path("trace2");
        let _ = fs::remove_file(&trace1);
        let _ = fs::remove_file(&trace2);
        let fp = format!("any:{n}");
        let r = d.agent_env(
            &["install", "v2.perch"],
            &[("PERCH_FAILPOINT", &fp), ("PERCH_TRACE", trace1.to_str().unwrap())],
        );
        if !killed(&r) {
            assert_eq!(r.code, 0, "{}", r.stderr);
            break;
        }
        points += 1;
        let when = format!("killed at install failpoint {n}");
        check_block_slots(&d, &new, &when);
        let st = d.status();
        let recorded = if st["deploy"]["state"] == "staging" {
            staging_points += 1;
            st["deploy"]["next_chunk"].as_u64().unwrap() as u32
        } else {
            0
        };
        // Every other kill is a power cut (the device reboots), the rest a
        // crash of the agent alone.
        if n % 2 == 0 {
            d.reboot();
            check_block_slots(&d, &new, &format!("{when}, after reboot"));
        }
        let r = d.agent_env(&["install", "v2.perch"], &[("PERCH_TRACE", trace2.to_str().unwrap())]);
        assert_eq!(r.code, 0, "{when}: restart: {} {}", r.stdout, r.stderr);
        check_block_slots(&d, &new, &format!("{when}, after restart"));
        let rewritten: BTreeSet<u32> = writes(&trace2).into_iter().filter(|i| *i < recorded).collect();
        assert!(rewritten.is_empty(), "{when}: resumed staging rewrote recorded chunks {rewritten:?}");
        resumed_skips += u64::from(recorded);
        // Finish: boot the new slot and let the trial commit.
        if d.state() != "committed" {
            if d.status()["booted_slot"] != "b" {
                assert_eq!(d.reboot(), "b", "{when}");
            }
            let r = d.agent(&["run", "--once"]);
            assert_eq!(r.code, 0, "{when}: {} {}", r.stdout, r.stderr);
        }
        let st = d.status();
        assert_eq!(st["deploy"]["state"], "committed", "{when}: {st}");
        assert_eq!(d.slot_bytes("b", LEN), new);
        assert_eq!(d.reboot(), "b", "{when}: committed slot must stay");
    }
    assert!(staging_points >= 200, "only {staging_points} kill points were in staging");
    assert!(resumed_skips > 0);

    // Phase 2: kills during the trial after the reboot.
    d.restore();
    assert_eq!(d.agent(&["install", "v2.perch"]).code, 0);
    assert_eq!(d.reboot(), "b");
    d.snapshot();
    for n in 1.. {
        d.restore();
        let fp = format!("any:{n}");
        let r = d.agent_env(&["run", "--once"], &[("PERCH_FAILPOINT", &fp)]);
        if !killed(&r) {
            assert_eq!(r.code, 0, "{}", r.stderr);
            break;
        }
        points += 1;
        let when = format!("killed at trial failpoint {n}");
        check_block_slots(&d, &new, &when);
        if n % 2 == 1 {
            // Power cut mid-trial: U-Boot counts one more boot of b.
            assert_eq!(d.reboot(), "b", "{when}");
        }
        let r = d.agent(&["run", "--once"]);
        assert_eq!(r.code, 0, "{when}: {} {}", r.stdout, r.stderr);
        assert_eq!(d.state(), "committed", "{when}");
        for _ in 0..3 {
            assert_eq!(d.reboot(), "b", "{when}: committed slot must stay");
        }
    }
    eprintln!("uboot: {points} kill points, {staging_points} in staging");
    assert!(points >= 250, "only {points} kill points");
}

/// A delta install (chunks read from the running slot, the rest from the
/// bundle) killed at every failpoint: the running slot is never written,
/// the firmware never points at an incomplete slot, and the install
/// resumes to an exact copy of the new release. Both releases are
/// compressed with linked chunks, so a resume also has to find the bytes
/// before its first chunk again (on the slot it writes) to decode it.
#[test]
fn uboot_delta_install_survives_sigkill_at_every_point() {
    const LEN: usize = 128 * 1024;
    let mut d = Device::new(Backend::Uboot);
    d.boot_model = true;
    d.checkpoint_bytes = 16 * 1024;
    d.write_config();
    // Two chains of linked chunks, staged side by side (on two cores or
    // more): a resume finds where each got to.
    let compress = ["--compress", "zstd:3", "--compress-chain", "64K"];
    // Release 2 runs in slot b, with its record.
    let v2 = perch_tests::device::repeating_image(7, LEN, 16 * 1024);
    fs::write(d.path("v2.payload"), &v2).unwrap();
    d.build("v2.perch", 2, "image", "v2.payload", CHUNK, &compress);
    assert_eq!(d.agent(&["install", "v2.perch"]).code, 0);
    assert_eq!(d.reboot(), "b");
    assert_eq!(d.agent(&["run", "--once"]).code, 0);
    assert_eq!(d.state(), "committed");
    // Release 3: every fourth chunk changed.
    let mut v3 = v2.clone();
    for c in (0..LEN / CHUNK as usize).step_by(4) {
        v3[c * CHUNK as usize + 9] ^= 0x5a;
    }
    fs::write(d.path("v3.payload"), &v3).unwrap();
    d.build("v3.perch", 3, "image", "v3.payload", CHUNK, &compress);
    let inspect = d.s.ok("perch", &["bundle", "inspect", "--json", "v3.perch"]);
    let inspect: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(inspect["compress_window"], 4 << 20, "{inspect}");
    assert_eq!(inspect["compress_chains"], 2, "{inspect}");
    // Each chain stores its first 16 KiB period whole.
    assert!(inspect["stored_len"].as_u64().unwrap() < LEN as u64 / 3, "{inspect}");
    d.snapshot();
    let check = |d: &Device, when: &str| {
        assert_eq!(d.slot_bytes("b", LEN), v2, "{when}: the running slot was written");
        match d.firmware_next().as_str() {
            "b" => {}
            "a" => assert_eq!(d.slot_bytes("a", LEN), v3, "{when}: firmware points at an incomplete slot a"),
            other => panic!("{when}: firmware points at '{other}'"),
        }
        assert!(d.status()["journal_problem"].is_null(), "{when}");
    };
    let mut points = 0;
    let mut reused_points = 0;
    for n in 1.. {
        d.restore();
        let trace = d.path("trace");
        let _ = fs::remove_file(&trace);
        let fp = format!("any:{n}");
        let r = d.agent_env(&["install", "v3.perch"], &[("PERCH_FAILPOINT", &fp)]);
        if !killed(&r) {
            assert_eq!(r.code, 0, "{}", r.stderr);
            assert!(r.stdout.contains("24 of 32 chunks are on slot b"), "{}", r.stdout);
            break;
        }
        points += 1;
        let when = format!("killed at delta failpoint {n}");
        check(&d, &when);
        let st = d.status();
        let recorded = match st["deploy"]["state"].as_str() {
            Some("staging") => st["deploy"]["next_chunk"].as_u64().unwrap_or(0) as u32,
            _ => 0,
        };
        if r.stdout.contains("chunks are on slot b") {
            reused_points += 1;
        }
        if n % 2 == 0 {
            // A power cut: the device boots what the firmware says.
            d.reboot();
            check(&d, &format!("{when}, after reboot"));
        }
        let r = d.agent_env(&["install", "v3.perch"], &[("PERCH_TRACE", trace.to_str().unwrap())]);
        assert_eq!(r.code, 0, "{when}: restart: {} {}", r.stdout, r.stderr);
        check(&d, &format!("{when}, after restart"));
        let rewritten: BTreeSet<u32> = writes(&trace).into_iter().filter(|i| *i < recorded).collect();
        assert!(rewritten.is_empty(), "{when}: resumed staging rewrote recorded chunks {rewritten:?}");
        if d.state() != "committed" {
            if d.status()["booted_slot"] != "a" {
                assert_eq!(d.reboot(), "a", "{when}");
            }
            let r = d.agent(&["run", "--once"]);
            assert_eq!(r.code, 0, "{when}: {} {}", r.stdout, r.stderr);
        }
        assert_eq!(d.state(), "committed", "{when}");
        assert_eq!(d.slot_bytes("a", LEN), v3, "{when}");
        assert_eq!(d.slot_bytes("b", LEN), v2, "{when}: the slot read from was written");
    }
    eprintln!("uboot delta: {points} kill points, {reused_points} after chunks were taken from slot b");
    assert!(reused_points >= 24, "only {reused_points} kill points after reusing began");
}

#[test]
fn uboot_rollback_survives_sigkill() {
    let mut d = Device::new(Backend::Uboot);
    // Hundreds of reboots: the boot script's model (tests/uboot.rs checks it).
    d.boot_model = true;
    d.health = "commands = [\"false\"]\ntrial = \"1s\"\ninterval = \"100ms\"\n".into();
    d.write_config();
    let new = d.image_bundle("v2.perch", 2, 7, 64 * 1024, CHUNK);
    assert_eq!(d.agent(&["install", "v2.perch"]).code, 0);
    assert_eq!(d.reboot(), "b");
    d.snapshot();
    let mut points = 0;
    for n in 1.. {
        d.restore();
        let fp = format!("any:{n}");
        let r = d.agent_env(&["run", "--once"], &[("PERCH_FAILPOINT", &fp)]);
        if !killed(&r) {
            break;
        }
        points += 1;
        let when = format!("killed at rollback failpoint {n}");
        let next = d.firmware_next();
        assert!(next == "a" || next == "b", "{when}");
        assert_eq!(d.slot_bytes("a", SLOT_SIZE), old_image(), "{when}");
        assert_eq!(d.slot_bytes("b", new.len()), new, "{when}");
        // Run until the device is back on slot a with the deploy rolled back.
        for _ in 0..4 {
            let r = d.agent(&["run", "--once"]);
            if d.state() == "rolled_back" {
                break;
            }
            assert!(r.stdout.contains("waiting for a reboot"), "{when}: {} {}", r.stdout, r.stderr);
            d.reboot();
        }
        let st = d.status();
        assert_eq!(st["deploy"]["state"], "rolled_back", "{when}: {st}");
        assert_eq!(d.firmware_next(), "a", "{when}");
        if st["booted_slot"] != "a" {
            assert_eq!(d.reboot(), "a", "{when}");
        }
    }
    eprintln!("uboot rollback: {points} kill points");
    assert!(points >= 5);
}

#[test]
fn dir_install_survives_sigkill_at_every_point() {
    let mut d = Device::new(Backend::Dir);
    d.checkpoint_bytes = 2048;
    d.write_config();
    let files: Vec<(String, String)> =
        (0..12).map(|i| (format!("f{i}"), format!("{i}").repeat(3000))).collect();
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    d.archive_bundle("v2.perch", 2, &refs);
    let old_tree = tree_digest(&d.path("root/a"));
    let new_tree = {
        let t = d.path("v2.perch.tree");
        tree_digest(&t)
    };
    d.snapshot();
    let mut points = 0;
    for n in 1.. {
        d.restore();
        let fp = format!("any:{n}");
        let r = d.agent_env(&["install", "v2.perch"], &[("PERCH_FAILPOINT", &fp)]);
        if !killed(&r) {
            assert_eq!(r.code, 0, "{}", r.stderr);
            break;
        }
        points += 1;
        let when = format!("killed at dir failpoint {n}");
        let current = d.firmware_next();
        let digest = tree_digest(&d.path(&format!("root/{current}")));
        assert!(
            (current == "a" && digest == old_tree) || (current == "b" && digest == new_tree),
            "{when}: current -> {current} holds neither release"
        );
        let r = d.agent(&["install", "v2.perch"]);
        assert_eq!(r.code, 0, "{when}: {} {}", r.stdout, r.stderr);
        assert_eq!(d.state(), "committed", "{when}");
        assert_eq!(tree_digest(&d.path("root/current")), new_tree, "{when}");
    }
    eprintln!("dir: {points} kill points");
    assert!(points >= 40, "only {points} kill points");
}

/// Recovering from damaged state (moving files aside, rewriting the
/// counters copy, starting a fresh journal) is SIGKILL-safe: after a kill
/// at any point of it, the next start still refuses the replay of an
/// older release, and ends with readable state.
#[test]
fn recovering_damaged_state_survives_sigkill_at_every_point() {
    let mut d = Device::new(Backend::Dir);
    d.archive_bundle("v9.perch", 9, &[("app", "nine\n")]);
    assert_eq!(d.agent(&["install", "v9.perch"]).code, 0);
    d.archive_bundle("v4.perch", 4, &[("app", "four\n")]);
    d.snapshot();
    type Damage = fn(&Device);
    let damage: [(&str, Damage); 3] = [
        ("corrupt journal", |d| {
            let mut j = fs::read(d.path("state/journal")).unwrap();
            let n = j.len();
            j[n - 3] ^= 0xff;
            fs::write(d.path("state/journal"), j).unwrap();
        }),
        ("corrupt counters", |d| fs::write(d.path("state/counters"), "garbage").unwrap()),
        ("journal and engine.lock as directories", |d| {
            for f in ["journal", "engine.lock"] {
                fs::remove_file(d.path(&format!("state/{f}"))).unwrap();
                fs::create_dir(d.path(&format!("state/{f}"))).unwrap();
            }
        }),
    ];
    let mut points = 0;
    for (what, damage) in damage {
        for n in 1.. {
            d.restore();
            damage(&d);
            let fp = format!("any:{n}");
            let r = d.agent_env(&["install", "v4.perch"], &[("PERCH_FAILPOINT", &fp)]);
            if !killed(&r) {
                assert_eq!(r.code, 3, "{what}: {} {}", r.stdout, r.stderr);
                break;
            }
            points += 1;
            let when = format!("{what}: killed at failpoint {n}");
            let r = d.agent(&["install", "v4.perch"]);
            assert_eq!(r.code, 3, "{when}: {} {}", r.stdout, r.stderr);
            assert!(r.stderr.contains("downgrade"), "{when}: {}", r.stderr);
            let st = d.status();
            assert!(st["journal_problem"].is_null(), "{when}: {st}");
            assert_eq!(st["highest_counters"]["os"], 9, "{when}");
            assert_eq!(fs::read_to_string(d.path("root/current/app")).unwrap(), "nine\n", "{when}");
        }
    }
    eprintln!("state recovery: {points} kill points");
    assert!(points >= 4, "only {points} kill points");
}
