//! The A/B deploy engine end to end, per backend, with the real binaries and
//! the real bootloader tools.

use std::fs;

use perch_tests::device::{old_image, tree_digest, Backend, Device, SLOT_SIZE};

const LEN: usize = 300 * 1024;

fn install(d: &Device, bundle: &str) -> perch_tests::Run {
    d.agent(&["install", bundle])
}

// ---------------------------------------------------------------- dir slots

#[test]
fn dir_good_bundle_commits() {
    let d = Device::new(Backend::Dir);
    d.archive_bundle("v2.perch", 2, &[("app", "new app\n"), ("conf", "x=1\n")]);
    let r = install(&d, "v2.perch");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("committed os #2"), "{}", r.stdout);
    assert_eq!(fs::read_link(d.path("root/current")).unwrap().to_str(), Some("b"));
    assert_eq!(fs::read_to_string(d.path("root/b/app")).unwrap(), "new app\n");
    let st = d.status();
    assert_eq!(st["deploy"]["state"], "committed");
    assert_eq!(st["booted_slot"], "b");
    assert_eq!(st["slots"]["b"]["counter"], 2);
    assert_eq!(st["last_outcome"]["outcome"], "committed");
    assert_eq!(st["highest_counters"]["os"], 2);
    // Installing the same bundle again is a no-op.
    let again = install(&d, "v2.perch");
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stdout.contains("already running"), "{}", again.stdout);
}

#[test]
fn dir_archive_keeps_permission_bits() {
    use std::os::unix::fs::PermissionsExt;
    let d = Device::new(Backend::Dir);
    let tree = d.path("v2.tree");
    fs::create_dir_all(tree.join("private")).unwrap();
    fs::write(tree.join("private/key"), "secret\n").unwrap();
    fs::write(tree.join("app"), "new app\n").unwrap();
    fs::set_permissions(tree.join("private/key"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(tree.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(tree.join("app"), fs::Permissions::from_mode(0o750)).unwrap();
    d.build("v2.perch", 2, "archive", "v2.tree", 1024, &[]);
    let r = install(&d, "v2.perch");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mode = |p: &str| fs::metadata(d.path(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("root/b/private"), 0o700);
    assert_eq!(mode("root/b/private/key"), 0o600);
    assert_eq!(mode("root/b/app"), 0o750);
}

#[test]
fn dir_signed_hostile_archive_exits_3_naming_the_entry_and_leaves_the_slots() {
    use perch_tests::device::raw_tar_entry as entry;
    // Each of these is validly signed, and each holds one entry the builder
    // never makes.
    // (name, type byte, mode, link target, what stderr says)
    type Case = (&'static [u8], u8, u32, &'static [u8], &'static str);
    let cases: [Case; 8] = [
        (b"null", b'3', 0o600, b"", "character device entries are not allowed"),
        (b"pipe", b'6', 0o600, b"", "FIFO entries are not allowed"),
        (b"../escape", b'0', 0o644, b"", "path has a `..` component"),
        (b"/etc/evil", b'0', 0o644, b"", "absolute path"),
        (b"su", b'0', 0o4755, b"", "is setuid/setgid, and the manifest does not allow it"),
        (b"drop/", b'5', 0o777, b"", "is world-writable"),
        (b"out/x", b'0', 0o644, b"", "its parent `out` is not a directory"),
        (b"hard", b'1', 0o644, b"/etc/shadow", "hardlink target `/etc/shadow` is not a regular file"),
    ];
    for (i, (name, kind, mode, link, why)) in cases.into_iter().enumerate() {
        let d = Device::new(Backend::Dir);
        let mut tar = Vec::new();
        entry(&mut tar, b"app", b'0', 0o755, b"", b"new app\n");
        entry(&mut tar, b"out", b'2', 0o777, b"/tmp", b"");
        entry(&mut tar, name, kind, mode, link, b"");
        tar.extend_from_slice(&[0; 1024]);
        let bundle = format!("hostile{i}.perch");
        d.signed_tar_bundle(&bundle, 2, &tar, false);
        let r = install(&d, &bundle);
        let shown = String::from_utf8_lossy(name);
        assert_eq!(r.code, 3, "{shown}: {}{}", r.stdout, r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{shown}: {}", r.stderr);
        assert!(r.stderr.contains(&format!("archive entry `{shown}`")), "{shown}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{shown}: {}", r.stderr);
        assert_eq!(r.stderr.matches(why).count(), 1, "said twice: {}", r.stderr);
        // The running slot is untouched, and nothing was unpacked.
        assert_eq!(fs::read_link(d.path("root/current")).unwrap().to_str(), Some("a"));
        assert_eq!(fs::read_to_string(d.path("root/a/app")).unwrap(), "old app\n");
        assert!(!d.path("root/b").exists(), "{shown}");
        assert!(!d.path("root/.b.new").exists(), "{shown}");
    }
}

#[test]
fn dir_setid_archive_installs_only_when_signed_so() {
    use perch_tests::device::raw_tar_entry as entry;
    use std::os::unix::fs::PermissionsExt;
    let d = Device::new(Backend::Dir);
    let mut tar = Vec::new();
    entry(&mut tar, b"app", b'0', 0o4755, b"", b"new app\n");
    tar.extend_from_slice(&[0; 1024]);
    d.signed_tar_bundle("setid.perch", 2, &tar, true);
    let r = install(&d, "setid.perch");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(fs::metadata(d.path("root/b/app")).unwrap().permissions().mode() & 0o7777, 0o4755);
}

/// An archive whose files repeat each other (copies of one library),
/// compressed with chunks linked to the bytes before them: the later
/// copies cost almost nothing, and the tree installs file for file.
#[test]
fn a_linked_compressed_archive_installs_file_for_file() {
    let d = Device::new(Backend::Dir);
    let tree = d.path("linked.tree");
    fs::create_dir_all(&tree).unwrap();
    let lib = perch_tests::device::new_image(5, 200 * 1024);
    for name in ["lib1.so", "lib2.so", "lib3.so"] {
        fs::write(tree.join(name), &lib).unwrap();
    }
    fs::write(tree.join("app"), b"app\n").unwrap();
    d.build("linked.perch", 2, "archive", "linked.tree", 16 * 1024, &["--compress", "zstd:3"]);
    let inspect = d.s.ok("perch", &["bundle", "inspect", "--json", "linked.perch"]);
    let inspect: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert!(inspect["stored_len"].as_u64().unwrap() < 300 * 1024, "{inspect}");
    let r = install(&d, "linked.perch");
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert_eq!(tree_digest(&d.path("root/b")), tree_digest(&tree));
}

#[test]
fn back_on_a_bundle_after_a_rollback_it_is_already_running() {
    let mut d = Device::new(Backend::Dir);
    d.health = format!(
        "commands = [\"test -f {}/current/healthy\"]\ntrial = \"2s\"\ninterval = \"200ms\"\n",
        d.path("root").display()
    );
    d.write_config();
    d.archive_bundle("v2.perch", 2, &[("app", "good\n"), ("healthy", "")]);
    assert_eq!(install(&d, "v2.perch").code, 0);
    d.archive_bundle("v3.perch", 3, &[("app", "broken\n")]);
    assert_eq!(install(&d, "v3.perch").code, 1);
    assert_eq!(d.status()["deploy"]["state"], "rolled_back");
    // Asked for release 2 again (a rollout aborted back to it): nothing to
    // do, and certainly not a "downgrade".
    let again = install(&d, "v2.perch");
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert!(again.stdout.contains("already running"), "{}", again.stdout);
}

#[test]
fn dir_failing_health_rolls_back() {
    let mut d = Device::new(Backend::Dir);
    d.health =
        "commands = [\"test -f current/healthy\"]\ntrial = \"2s\"\ninterval = \"200ms\"\ntimeout = \"1s\"\n"
            .into();
    d.write_config();
    let before = tree_digest(&d.path("root/a"));
    d.archive_bundle("v2.perch", 2, &[("app", "broken\n")]);
    let r = d.agent(&["install", "v2.perch"]);
    assert_eq!(r.code, 1, "rolled back is a failed deploy: {}", r.stdout);
    assert!(r.stdout.contains("rolled back os #2"), "{}", r.stdout);
    assert_eq!(fs::read_link(d.path("root/current")).unwrap().to_str(), Some("a"));
    assert_eq!(tree_digest(&d.path("root/a")), before);
    let st = d.status();
    assert_eq!(st["deploy"]["state"], "rolled_back");
    assert!(st["deploy"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("health: command `test -f current/healthy`"));
    assert!(st["highest_counters"]["os"].is_null(), "a rolled-back counter is not committed");
}

#[test]
fn dir_health_checks_pass_with_the_new_slot() {
    let mut d = Device::new(Backend::Dir);
    d.health = format!(
        "commands = [\"test -f {}/current/healthy\"]\ntrial = \"10s\"\ninterval = \"100ms\"\n",
        d.path("root").display()
    );
    d.write_config();
    d.archive_bundle("v2.perch", 2, &[("app", "new\n"), ("healthy", "yes\n")]);
    let r = d.agent(&["install", "v2.perch"]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert_eq!(d.state(), "committed");
}

#[test]
fn dir_fallback_during_trial_is_detected() {
    let d = Device::new(Backend::Dir);
    d.archive_bundle("v2.perch", 2, &[("app", "new\n")]);
    // Killed in the middle of the trial...
    let r = d.agent_env(&["install", "v2.perch"], &[("PERCH_FAILPOINT", "trial:1")]);
    assert_eq!(r.code, -1, "expected SIGKILL: {}", r.stderr);
    assert_eq!(d.state(), "trial");
    // ...and something (a watchdog, a person) put the old slot back.
    fs::remove_file(d.path("root/current")).unwrap();
    std::os::unix::fs::symlink("a", d.path("root/current")).unwrap();
    let r = d.agent(&["run", "--once"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let st = d.status();
    assert_eq!(st["deploy"]["state"], "rolled_back");
    assert_eq!(st["deploy"]["reason"], "boot_fallback");
}

#[test]
fn dir_refuses_image_bundles() {
    let d = Device::new(Backend::Dir);
    d.image_bundle("img.perch", 2, 1, 10_000, 4096);
    let r = install(&d, "img.perch");
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("directory slots take archive bundles"), "{}", r.stderr);
    assert_eq!(fs::read_link(d.path("root/current")).unwrap().to_str(), Some("a"));
}

// ------------------------------------------------------------- block slots

fn block_good_bundle_commits(backend: Backend) {
    let mut d = Device::new(backend);
    let payload = d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    let r = install(&d, "v2.perch");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("waiting for a reboot into slot b"), "{}", r.stdout);
    assert_eq!(d.state(), "trial");
    assert_eq!(d.next_boot(), "b");
    assert_eq!(d.slot_bytes("b", LEN), payload);
    assert_eq!(d.slot_bytes("a", SLOT_SIZE), old_image(), "running slot untouched");
    // Running `run` before the reboot changes nothing.
    let r = d.agent(&["run", "--once"]);
    assert!(r.stdout.contains("waiting for a reboot into slot b"), "{}", r.stdout);
    assert_eq!(d.reboot(), "b");
    let r = d.agent(&["run", "--once"]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("committed os #2"), "{}", r.stdout);
    let st = d.status();
    assert_eq!(st["deploy"]["state"], "committed");
    assert_eq!(st["booted_slot"], "b");
    assert_eq!(st["next_boot_slot"], "b");
    // The bootloader no longer counts boots; the next reboot stays on b.
    for _ in 0..4 {
        assert_eq!(d.reboot(), "b");
    }
}

fn block_failing_health_rolls_back(backend: Backend) {
    let mut d = Device::new(backend);
    d.health = "commands = [\"false\"]\ntrial = \"1s\"\ninterval = \"100ms\"\n".into();
    d.write_config();
    d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    assert_eq!(install(&d, "v2.perch").code, 0);
    assert_eq!(d.reboot(), "b");
    let r = d.agent(&["run", "--once"]);
    assert!(r.stdout.contains("waiting for a reboot into slot a"), "{} {}", r.stdout, r.stderr);
    assert_eq!(d.state(), "rolling_back");
    assert_eq!(d.next_boot(), "a");
    assert_eq!(d.reboot(), "a");
    let r = d.agent(&["run", "--once"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let st = d.status();
    assert_eq!(st["deploy"]["state"], "rolled_back");
    assert!(st["deploy"]["reason"].as_str().unwrap().starts_with("health: command `false` failed"), "{st}");
    assert_eq!(st["booted_slot"], "a");
    assert_eq!(d.slot_bytes("a", SLOT_SIZE), old_image());
    assert_eq!(d.reboot(), "a");
}

fn block_boot_fallback_detected(backend: Backend) {
    let mut d = Device::new(backend);
    d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    assert_eq!(install(&d, "v2.perch").code, 0);
    // The new slot hangs at boot: the agent never runs there. The bootloader
    // gives up by itself (U-Boot after bootlimit, GRUB after one try).
    let mut booted = d.reboot();
    for _ in 0..5 {
        if booted == "a" {
            break;
        }
        booted = d.reboot();
    }
    assert_eq!(booted, "a", "the bootloader must fall back");
    let r = d.agent(&["run", "--once"]);
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let st = d.status();
    assert_eq!(st["deploy"]["state"], "rolled_back");
    assert_eq!(st["deploy"]["reason"], "boot_fallback");
    assert_eq!(st["last_outcome"]["reason"], "boot_fallback");
    assert_eq!(d.next_boot(), "a");
}

#[test]
fn uboot_good_bundle_commits() {
    block_good_bundle_commits(Backend::Uboot);
}

#[test]
fn uboot_failing_health_rolls_back() {
    block_failing_health_rolls_back(Backend::Uboot);
}

#[test]
fn uboot_boot_fallback_detected() {
    block_boot_fallback_detected(Backend::Uboot);
}

#[test]
fn grub_good_bundle_commits() {
    block_good_bundle_commits(Backend::Grub);
}

#[test]
fn grub_failing_health_rolls_back() {
    block_failing_health_rolls_back(Backend::Grub);
}

#[test]
fn grub_boot_fallback_detected() {
    block_boot_fallback_detected(Backend::Grub);
}

// -------------------------------------------------------------------- hook

#[test]
fn hook_good_bundle_commits_and_bad_health_rolls_back() {
    let mut d = Device::new(Backend::Hook);
    let payload = d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    let r = install(&d, "v2.perch");
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert_eq!(d.state(), "committed");
    assert_eq!(d.slot_bytes("b", LEN), payload);
    let log = fs::read_to_string(d.path("hook.log")).unwrap();
    assert_eq!(log, "write b image\nactivate b\nconfirm b\n");
    d.health = "commands = [\"false\"]\ntrial = \"1s\"\ninterval = \"100ms\"\n".into();
    d.write_config();
    d.image_bundle("v3.perch", 3, 2, LEN, 16 * 1024);
    let r = install(&d, "v3.perch");
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let log = fs::read_to_string(d.path("hook.log")).unwrap();
    assert!(log.ends_with("write a image\nactivate a\nrollback b\n"), "{log}");
    assert_eq!(d.status()["booted_slot"], "b");
}

#[test]
fn hook_signed_hostile_archive_exits_3_before_any_hook_runs() {
    use perch_tests::device::raw_tar_entry as entry;
    // The `write` hook may run any `tar -x`: the engine, not the backend,
    // must refuse these, before `write` or `activate` sees the payload.
    type Case = (&'static [u8], u8, u32, &'static str);
    let cases: [Case; 4] = [
        (b"null", b'3', 0o600, "character device entries are not allowed"),
        (b"pipe", b'6', 0o600, "FIFO entries are not allowed"),
        (b"../escape", b'0', 0o644, "path has a `..` component"),
        (b"su", b'0', 0o4755, "is setuid/setgid, and the manifest does not allow it"),
    ];
    for (i, (name, kind, mode, why)) in cases.into_iter().enumerate() {
        let d = Device::new(Backend::Hook);
        let mut tar = Vec::new();
        entry(&mut tar, b"app", b'0', 0o755, b"", b"new app\n");
        entry(&mut tar, name, kind, mode, b"", b"");
        tar.extend_from_slice(&[0; 1024]);
        let bundle = format!("hostile{i}.perch");
        d.signed_tar_bundle(&bundle, 2, &tar, false);
        let r = install(&d, &bundle);
        let shown = String::from_utf8_lossy(name);
        assert_eq!(r.code, 3, "{shown}: {}{}", r.stdout, r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{shown}: {}", r.stderr);
        assert!(r.stderr.contains(&format!("archive entry `{shown}`")), "{shown}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{shown}: {}", r.stderr);
        let log = fs::read_to_string(d.path("hook.log")).unwrap_or_default();
        assert!(!log.contains("write") && !log.contains("activate"), "{shown}: hooks ran: {log}");
        assert_eq!(d.status()["booted_slot"], "a");
        assert_eq!(d.state(), "failed");
    }
    // A tame archive still reaches `write`, as `PERCH_KIND=archive`.
    let d = Device::new(Backend::Hook);
    let mut tar = Vec::new();
    entry(&mut tar, b"app", b'0', 0o755, b"", b"new app\n");
    tar.extend_from_slice(&[0; 1024]);
    d.signed_tar_bundle("tame.perch", 2, &tar, false);
    let r = install(&d, "tame.perch");
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let log = fs::read_to_string(d.path("hook.log")).unwrap();
    assert_eq!(log, "write b archive\nactivate b\nconfirm b\n");
}

#[test]
fn hook_fallback_during_trial_is_detected() {
    let d = Device::new(Backend::Hook);
    d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    let r = d.agent_env(&["install", "v2.perch"], &[("PERCH_FAILPOINT", "trial:1")]);
    assert_eq!(r.code, -1, "expected SIGKILL: {}", r.stderr);
    assert_eq!(d.state(), "trial");
    // The device's own watchdog went back to slot a while the agent was down.
    fs::write(d.path("hook-booted"), "a\n").unwrap();
    let r = d.agent(&["run", "--once"]);
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let st = d.status();
    assert_eq!(st["deploy"]["reason"], "boot_fallback");
    let log = fs::read_to_string(d.path("hook.log")).unwrap();
    assert!(log.ends_with("rollback a\n"), "{log}");
}

#[test]
fn power_cut_before_confirm_then_fallback_is_not_committed() {
    let mut d = Device::new(Backend::Uboot);
    d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    assert_eq!(install(&d, "v2.perch").code, 0);
    assert_eq!(d.reboot(), "b");
    // Health passed and Committing is recorded, then the power goes before
    // the bootloader was told. The slot keeps failing to come up after
    // that, so U-Boot falls back by itself.
    let r = d.agent_env(&["run", "--once"], &[("PERCH_FAILPOINT", "committing:1")]);
    assert_eq!(r.code, -1, "{}", r.stderr);
    assert_eq!(d.state(), "committing");
    let mut booted = d.reboot();
    while booted == "b" {
        booted = d.reboot();
    }
    let r = d.agent(&["run", "--once"]);
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let st = d.status();
    assert_eq!(st["deploy"]["state"], "rolled_back", "{st}");
    assert_eq!(st["deploy"]["reason"], "boot_fallback");
    assert!(st["highest_counters"]["os"].is_null(), "a slot that never came up is not committed");
    assert_eq!(d.next_boot(), "a");
    assert_eq!(d.reboot(), "a");
}

#[test]
fn a_slot_write_error_fails_cleanly() {
    let d = Device::new(Backend::Uboot);
    let cfg = fs::read_to_string(d.path("agent.toml")).unwrap();
    fs::write(d.path("agent.toml"), cfg.replace(&d.path("b.img").display().to_string(), "/dev/full"))
        .unwrap();
    d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    let r = install(&d, "v2.perch");
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("/dev/full"), "{}", r.stderr);
    let st = d.status();
    assert_eq!(st["deploy"]["state"], "failed");
    assert_eq!(st["next_boot_slot"], "a");
    assert_eq!(d.slot_bytes("a", SLOT_SIZE), old_image());
}

// ---------------------------------------------------------- operator acts

#[test]
fn manual_commit_and_rollback() {
    let mut d = Device::new(Backend::Uboot);
    d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    assert_eq!(install(&d, "v2.perch").code, 0);
    assert_eq!(d.reboot(), "b");
    let r = d.agent(&["commit"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(d.state(), "committed");
    assert_ne!(d.agent(&["commit"]).code, 0, "nothing left to commit");
    // Slot a holds nothing perch installed: there is nothing to go back to.
    assert_ne!(d.agent(&["rollback"]).code, 0);
    d.image_bundle("v3.perch", 3, 2, LEN, 16 * 1024);
    assert_eq!(install(&d, "v3.perch").code, 0);
    assert_eq!(d.reboot(), "a");
    assert_eq!(d.agent(&["run", "--once"]).code, 0);
    // Rolling back a committed deploy goes to the other slot, which still
    // holds the previous release.
    let r = d.agent(&["rollback"]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert_eq!(d.next_boot(), "b");
    assert_eq!(d.reboot(), "b");
    assert_eq!(d.agent(&["run", "--once"]).code, 1);
    let st = d.status();
    assert_eq!(st["deploy"]["reason"], "manual");
    assert_eq!(st["booted_slot"], "b");
}

#[test]
fn commit_and_rollback_decide_a_trial_another_process_runs() {
    let mut d = Device::new(Backend::Dir);
    // Checks that fail until someone decides: the trial would run 60 s.
    d.health = "commands = [\"false\"]\ntrial = \"60s\"\ninterval = \"200ms\"\n".into();
    d.write_config();
    // The command succeeds either way; the install whose trial was rolled
    // back fails.
    for (counter, verb, state, code) in [(2, "commit", "committed", 0), (3, "rollback", "rolled_back", 1)] {
        let bundle = format!("v{counter}.perch");
        d.archive_bundle(&bundle, counter, &[("app", &format!("{counter}\n"))]);
        let child = spawn_install(&d, &bundle);
        assert!(
            (0..100).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                d.state() == "trial"
            }),
            "the install's trial did not start"
        );
        // The install holds the engine; the decision is handed to it.
        let r = d.agent(&[verb]);
        assert_eq!(r.code, 0, "{verb}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stdout.contains(&format!("runs in another process (perch-agent (pid {}", child.id())),
            "{}",
            r.stdout
        );
        assert_eq!(d.state(), state);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(!d.path("state/decision").exists(), "the decision was taken");
    }
    assert_eq!(d.status()["deploy"]["reason"], "manual");
    assert_eq!(fs::read_to_string(d.path("root/current/app")).unwrap(), "2\n");
}

// ---------------------------------------------------------- inhibit gate

/// A dir device whose activation waits while the file `armed` exists (it
/// does, to start with).
fn gated_device() -> Device {
    let mut d = Device::new(Backend::Dir);
    d.inhibit = format!("file = \"{}\"\n", d.path("armed").display());
    d.write_config();
    fs::write(d.path("armed"), "").unwrap();
    d
}

/// `perch-agent install BUNDLE` in the background.
fn spawn_install(d: &Device, bundle: &str) -> std::process::Child {
    std::process::Command::new(perch_tests::bin("perch-agent"))
        .arg("--config")
        .arg(d.path("agent.toml"))
        .arg("--state-dir")
        .arg(d.path("state"))
        .args(["install", bundle])
        .current_dir(d.s.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn inhibit_defers_activation_not_staging() {
    let d = gated_device();
    d.archive_bundle("v2.perch", 2, &[("app", "new\n")]);
    let child = spawn_install(&d, "v2.perch");
    // Staging completes while armed...
    let mut staged = false;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if d.state() == "staged" {
            staged = true;
            break;
        }
    }
    assert!(staged, "staging must not wait for the gate");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(d.state(), "staged", "activation must wait while armed");
    assert_eq!(fs::read_link(d.path("root/current")).unwrap().to_str(), Some("a"));
    // ...and activation follows once disarmed.
    fs::remove_file(d.path("armed")).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("activation deferred: inhibit file"));
    assert_eq!(d.state(), "committed");
}

#[test]
fn a_second_engine_is_refused_while_one_works() {
    let d = gated_device();
    d.archive_bundle("v2.perch", 2, &[("app", "two\n")]);
    d.archive_bundle("v3.perch", 3, &[("app", "three\n")]);
    let child = spawn_install(&d, "v2.perch");
    // The first install holds the engine, waiting at the inhibit gate.
    for _ in 0..100 {
        if d.state() == "staged" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(d.state(), "staged", "status reads while an engine works");
    for args in [&["install", "v3.perch"][..], &["commit"][..], &["rollback"][..], &["run", "--once"][..]] {
        let r = d.agent(args);
        assert_eq!(r.code, 1, "{args:?}: {}{}", r.stdout, r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains("is using the deploy engine"), "{}", r.stderr);
        assert!(r.stderr.contains(&format!("pid {}: install v2.perch", child.id())), "{}", r.stderr);
    }
    assert_eq!(d.state(), "staged", "the refused commands changed nothing");
    assert_eq!(fs::read_link(d.path("root/current")).unwrap().to_str(), Some("a"));
    fs::remove_file(d.path("armed")).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.state(), "committed");
    // Released with the process: the next command gets the engine.
    let r = install(&d, "v3.perch");
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(fs::read_to_string(d.path("root/current/app")).unwrap(), "three\n");
}

// --------------------------------------------------------- hostile bundles

#[test]
fn hostile_bundles_are_refused_and_the_running_slot_is_untouched() {
    let mut d = Device::new(Backend::Uboot);
    d.image_bundle("v5.perch", 5, 1, LEN, 16 * 1024);
    assert_eq!(install(&d, "v5.perch").code, 0);
    assert_eq!(d.reboot(), "b");
    assert_eq!(d.agent(&["run", "--once"]).code, 0);
    let running = d.slot_bytes("b", SLOT_SIZE);
    let env_before = fs::read(d.path("env")).unwrap();
    let check = |d: &Device, file: &str, needle: &str| {
        let r = d.agent(&["install", file]);
        assert_eq!(r.code, 3, "{file}: {} {}", r.stdout, r.stderr);
        assert!(r.stderr.contains(needle), "{file}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert_eq!(d.slot_bytes("b", SLOT_SIZE), running, "{file}: running slot changed");
        assert_eq!(fs::read(d.path("env")).unwrap(), env_before, "{file}: bootloader env changed");
        assert_eq!(d.status()["booted_slot"], "b");
    };
    // Wrong target.
    d.target = "other-board".into();
    d.image_bundle("wrong-target.perch", 9, 2, LEN, 16 * 1024);
    d.target = "test-board".into();
    check(&d, "wrong-target.perch", "this device is 'test-board'");
    // Replay of a lower (and of the same) counter.
    d.image_bundle("old.perch", 4, 3, LEN, 16 * 1024);
    check(&d, "old.perch", "downgrade");
    // The running bundle itself is simply already installed.
    let r = d.agent(&["install", "v5.perch"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("already running"));
    // Bad signature: one flipped byte in the first signature.
    d.image_bundle("good6.perch", 6, 4, LEN, 16 * 1024);
    let good = fs::read(d.path("good6.perch")).unwrap();
    // Format 2: header (20), signed digest (32), signature count (1), key id (32), then the signature.
    let sig_at = 20 + 32 + 1 + 32 + 1 + 10;
    let mut bad = good.clone();
    bad[sig_at] ^= 0x10;
    fs::write(d.path("badsig.perch"), &bad).unwrap();
    check(&d, "badsig.perch", "bad signature");
    // A chunk corrupted in the middle.
    let mut bad = good.clone();
    bad[good.len() - LEN / 2] ^= 0x01;
    fs::write(d.path("badchunk.perch"), &bad).unwrap();
    check(&d, "badchunk.perch", "sha256 mismatch");
    assert_eq!(d.state(), "failed");
    // Truncated.
    fs::write(d.path("short.perch"), &good[..good.len() - 1000]).unwrap();
    check(&d, "short.perch", "truncated");
    // And the real one still installs.
    assert_eq!(install(&d, "good6.perch").code, 0);
    assert_eq!(d.state(), "trial");
}

#[test]
fn corrupt_journal_keeps_the_running_slot() {
    let mut d = Device::new(Backend::Uboot);
    d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    assert_eq!(install(&d, "v2.perch").code, 0);
    assert_eq!(d.reboot(), "b");
    assert_eq!(d.agent(&["run", "--once"]).code, 0);
    d.image_bundle("v3.perch", 3, 2, LEN, 16 * 1024);
    assert_eq!(install(&d, "v3.perch").code, 0, "now on trial of slot a");
    assert_eq!(d.next_boot(), "a");
    let mut j = fs::read(d.path("state/journal")).unwrap();
    let n = j.len();
    j[n - 3] ^= 0xff;
    fs::write(d.path("state/journal"), &j).unwrap();
    let r = d.agent(&["run", "--once"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("journal") && r.stderr.contains("CRC mismatch"), "{}", r.stderr);
    assert!(r.stderr.contains("kept the running slot"), "{}", r.stderr);
    // The bootloader points at the slot that is running (b), not the trial.
    assert_eq!(d.next_boot(), "b");
    assert_eq!(d.reboot(), "b");
    let st = d.status();
    assert_eq!(st["deploy"]["state"], "idle");
    // Rollback protection survived in the counters file.
    assert_eq!(st["highest_counters"]["os"], 2);
    d.image_bundle("v1.perch", 1, 3, LEN, 16 * 1024);
    let r = install(&d, "v1.perch");
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(fs::read_dir(d.path("state")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("journal.corrupt")));
}

#[test]
fn bad_config_names_the_key() {
    let d = Device::new(Backend::Dir);
    let cfg = fs::read_to_string(d.path("agent.toml")).unwrap();
    fs::write(d.path("agent.toml"), cfg.replace("[health]", "[health]\nretries = 3")).unwrap();
    let r = d.agent(&["status"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("health: unknown key `retries`"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1);
    fs::write(d.path("agent.toml"), cfg.replace("trial = \"20s\"", "trial = \"soon\"")).unwrap();
    let r = d.agent(&["status"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("'soon' is not a duration"), "{}", r.stderr);
}

// ------------------------------------------------ damaged or lost state

/// A device running os #9 (dir slots), with a signed os #4 ready to replay.
fn device_on_release_9() -> Device {
    let d = Device::new(Backend::Dir);
    d.archive_bundle("v9.perch", 9, &[("app", "nine\n")]);
    let r = install(&d, "v9.perch");
    assert_eq!(r.code, 0, "{}", r.stderr);
    d.archive_bundle("v4.perch", 4, &[("app", "four\n")]);
    d
}

/// One way to damage a state file.
type Damage = fn(&Device);

fn aside_files(d: &Device, name: &str) -> usize {
    let prefix = format!("{name}.corrupt-");
    fs::read_dir(d.path("state"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(&prefix))
        .count()
}

fn notices(d: &Device) -> String {
    d.status()["state_notices"].to_string()
}

#[test]
fn rollback_protection_survives_the_loss_of_either_file() {
    let d = device_on_release_9();
    fs::remove_file(d.path("state/journal")).unwrap();
    assert_eq!(d.status()["highest_counters"]["os"], 9, "status reads the counters copy");
    let r = install(&d, "v4.perch");
    assert_eq!(r.code, 3, "journal lost: {} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("downgrade"), "{}", r.stderr);
    fs::remove_file(d.path("state/counters")).unwrap();
    let r = install(&d, "v4.perch");
    assert_eq!(r.code, 3, "counters lost: {} {}", r.stdout, r.stderr);
    assert!(d.path("state/counters").is_file(), "the copy is rewritten from the journal");
    fs::remove_file(d.path("state/journal")).unwrap();
    let r = install(&d, "v4.perch");
    assert_eq!(r.code, 3, "the rewritten copy holds: {} {}", r.stdout, r.stderr);
    assert_eq!(d.status()["highest_counters"]["os"], 9);
    assert_eq!(fs::read_to_string(d.path("root/current/app")).unwrap(), "nine\n");
}

#[test]
fn a_damaged_counters_file_is_moved_aside_rewritten_and_reported() {
    let d = device_on_release_9();
    let damage: [(&str, Damage); 3] = [
        ("garbage", |d| fs::write(d.path("state/counters"), "not counters").unwrap()),
        ("oversize", |d| fs::write(d.path("state/counters"), vec![0u8; (1 << 20) + 64]).unwrap()),
        ("directory", |d| {
            fs::remove_file(d.path("state/counters")).unwrap();
            fs::create_dir(d.path("state/counters")).unwrap();
        }),
    ];
    for (n, (what, damage)) in damage.iter().enumerate() {
        damage(&d);
        let st = d.status();
        assert!(st["journal_problem"].as_str().unwrap_or("").contains("counters file"), "{what}: {st}");
        let r = install(&d, "v4.perch");
        assert_eq!(r.code, 3, "{what}: {} {}", r.stdout, r.stderr);
        assert!(r.stderr.contains("downgrade"), "{what}: {}", r.stderr);
        let warning: Vec<_> = r.stderr.lines().filter(|l| l.contains("counters file")).collect();
        assert_eq!(warning.len(), 1, "{what}: {}", r.stderr);
        assert!(warning[0].contains("moved aside"), "{what}: {}", r.stderr);
        assert_eq!(aside_files(&d, "counters"), n + 1, "{what}");
        assert!(d.path("state/counters").is_file(), "{what}: rewritten");
        let st = d.status();
        assert!(st["journal_problem"].is_null(), "{what}: {st}");
        assert!(notices(&d).contains("counters file"), "{what}: {st}");
        let text = d.agent(&["status"]);
        assert!(text.stdout.contains("WARNING") && text.stdout.contains("counters file"), "{}", text.stdout);
    }
}

#[test]
fn losing_both_records_is_said_loudly() {
    let d = device_on_release_9();
    fs::remove_file(d.path("state/journal")).unwrap();
    fs::remove_file(d.path("state/counters")).unwrap();
    let st = d.status();
    assert!(st["journal_problem"].as_str().unwrap_or("").contains("ROLLBACK PROTECTION LOST"), "{st}");
    // Nothing is left to compare with: the replay installs, but not quietly.
    let r = install(&d, "v4.perch");
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert_eq!(
        r.stderr.lines().filter(|l| l.contains("ROLLBACK PROTECTION LOST")).count(),
        1,
        "{}",
        r.stderr
    );
    assert!(notices(&d).contains("ROLLBACK PROTECTION LOST"));
    // A new device is not warned about anything.
    let fresh = Device::new(Backend::Dir);
    fresh.archive_bundle("v1.perch", 1, &[("app", "one\n")]);
    let r = install(&fresh, "v1.perch");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "", "a first install warns of nothing");
    assert_eq!(fresh.status()["state_notices"], serde_json::json!([]));
}

#[test]
fn an_unusable_journal_or_engine_lock_is_moved_aside_and_the_device_goes_on() {
    let d = device_on_release_9();
    let damage: [(&str, &str, Damage); 4] = [
        ("journal over the size cap", "journal", |d| {
            fs::write(d.path("state/journal"), vec![7u8; (1 << 20) + 21]).unwrap()
        }),
        ("journal as a directory", "journal", |d| {
            fs::remove_file(d.path("state/journal")).unwrap();
            fs::create_dir(d.path("state/journal")).unwrap();
        }),
        ("journal as a symlink to a FIFO", "journal", |d| {
            fs::remove_file(d.path("state/journal")).unwrap();
            assert!(std::process::Command::new("mkfifo").arg(d.path("fifo")).status().unwrap().success());
            std::os::unix::fs::symlink(d.path("fifo"), d.path("state/journal")).unwrap();
        }),
        ("engine.lock as a directory", "engine.lock", |d| {
            fs::remove_file(d.path("state/engine.lock")).unwrap();
            fs::create_dir(d.path("state/engine.lock")).unwrap();
        }),
    ];
    for (n, (what, file, damage)) in damage.iter().enumerate() {
        damage(&d);
        let r = d.agent(&["run", "--once"]);
        assert_eq!(r.code, 0, "{what}: run: {} {}", r.stdout, r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{what}: one line: {}", r.stderr);
        assert!(r.stderr.contains("moved aside"), "{what}: {}", r.stderr);
        assert!(aside_files(&d, file) >= 1, "{what}: kept for inspection");
        let counter = 10 + n as u64;
        let name = format!("v{counter}.perch");
        d.archive_bundle(&name, counter, &[("app", "next\n")]);
        let r = install(&d, &name);
        assert_eq!(r.code, 0, "{what}: install: {} {}", r.stdout, r.stderr);
        assert!(r.stdout.contains(&format!("committed os #{counter}")), "{what}: {}", r.stdout);
    }
    // Rollback protection came through all of it.
    let r = install(&d, "v4.perch");
    assert_eq!(r.code, 3, "{} {}", r.stdout, r.stderr);
}

#[test]
fn a_rejected_bundle_leaves_its_slot_marked_dirty() {
    let d = Device::new(Backend::Uboot);
    d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    let good = fs::read(d.path("v2.perch")).unwrap();
    // The last chunk is corrupt: the verified ones before it reach slot b.
    let mut bad = good.clone();
    bad[good.len() - 100] ^= 0x01;
    fs::write(d.path("bad.perch"), &bad).unwrap();
    let r = install(&d, "bad.perch");
    assert_eq!(r.code, 3, "{} {}", r.stdout, r.stderr);
    let st = d.status();
    assert_eq!(st["slots"]["b"]["dirty"], true, "{st}");
    assert_eq!(st["slots"]["b"]["partial"]["counter"], 2, "{st}");
    assert!(st["slots"]["b"]["counter"].is_null(), "a dirty slot holds no known bundle: {st}");
    assert_eq!(st["next_boot_slot"], "a");
    let text = d.agent(&["status"]);
    assert!(text.stdout.contains("slot b       dirty"), "{}", text.stdout);
    // Nothing to roll back to, and the good bundle replaces the partial one.
    assert_ne!(d.agent(&["rollback"]).code, 0);
    assert_eq!(install(&d, "v2.perch").code, 0);
    assert_eq!(d.status()["slots"]["b"]["counter"], 2);
}

#[test]
fn a_failed_install_names_its_bundle_in_the_reason() {
    let d = Device::new(Backend::Uboot);
    d.image_bundle("v2.perch", 2, 1, LEN, 16 * 1024);
    let mut bad = fs::read(d.path("v2.perch")).unwrap();
    let n = bad.len();
    bad[n - LEN / 2] ^= 0x01;
    fs::write(d.path("bad.perch"), &bad).unwrap();
    assert_eq!(install(&d, "bad.perch").code, 3);
    let st = d.status();
    for reason in [&st["last_outcome"]["reason"], &st["deploy"]["reason"]] {
        let reason = reason.as_str().unwrap_or_default();
        assert!(reason.starts_with("bad.perch: "), "{reason}");
        assert!(reason.contains("sha256 mismatch"), "{reason}");
    }
}

#[test]
fn a_release_rolled_back_by_hand_can_be_installed_again_but_nothing_older() {
    let d = Device::new(Backend::Dir);
    d.archive_bundle("v2.perch", 2, &[("app", "two\n")]);
    d.archive_bundle("v3.perch", 3, &[("app", "three\n")]);
    assert_eq!(install(&d, "v2.perch").code, 0);
    assert_eq!(install(&d, "v3.perch").code, 0);
    let r = d.agent(&["rollback"]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert_eq!(fs::read_to_string(d.path("root/current/app")).unwrap(), "two\n");
    // The release it left was committed once: it may come back.
    let r = install(&d, "v3.perch");
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("committed os #3"), "{}", r.stdout);
    // Older releases may not, nor another bundle signed with the same counter.
    let r = install(&d, "v2.perch");
    assert_eq!(r.code, 3, "{} {}", r.stdout, r.stderr);
    d.archive_bundle("other3.perch", 3, &[("app", "another three\n")]);
    let r = install(&d, "other3.perch");
    assert_eq!(r.code, 3, "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("downgrade"), "{}", r.stderr);
}

// ---------------------------------------------------------- exit codes

#[test]
fn a_rollback_that_rolls_back_exits_0() {
    let d = Device::new(Backend::Dir);
    d.archive_bundle("v2.perch", 2, &[("app", "two\n")]);
    d.archive_bundle("v3.perch", 3, &[("app", "three\n")]);
    assert_eq!(install(&d, "v2.perch").code, 0);
    assert_eq!(install(&d, "v3.perch").code, 0);
    let r = d.agent(&["rollback"]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("rolled back os #3"), "{}", r.stdout);
    assert_eq!(d.state(), "rolled_back");
    // Nothing left to roll back: a failure.
    assert_eq!(d.agent(&["rollback"]).code, 1);
}

#[test]
fn install_without_the_trust_file_is_a_config_error() {
    let d = Device::new(Backend::Dir);
    d.archive_bundle("v2.perch", 2, &[("app", "two\n")]);
    fs::rename(d.path("org/trust.doc"), d.path("org/trust.doc.away")).unwrap();
    let r = install(&d, "v2.perch");
    assert_eq!(r.code, 2, "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("trust.doc"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

// ------------------------------------------------------------------- delta

/// Installs `bundle` on a U-Boot device and takes it through its trial boot.
fn install_and_commit(d: &mut Device, bundle: &str) -> String {
    let r = install(d, bundle);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    d.reboot();
    let run = d.agent(&["run", "--once"]);
    assert_eq!(run.code, 0, "{} {}", run.stdout, run.stderr);
    assert_eq!(d.state(), "committed", "{}", run.stdout);
    r.stdout
}

/// A new release of `payload` with `len` bytes changed at `at`.
fn changed(payload: &[u8], at: usize, len: usize) -> Vec<u8> {
    let mut p = payload.to_vec();
    for b in &mut p[at..at + len] {
        *b = !*b;
    }
    p
}

fn build_image(d: &Device, out: &str, counter: u64, payload: &[u8]) {
    fs::write(d.path(&format!("{out}.payload")), payload).unwrap();
    d.build(out, counter, "image", &format!("{out}.payload"), 16 * 1024, &["--compress", "zstd:3"]);
}

/// An install cut short (the link lost, the agent killed) leaves chunks of
/// its bundle on the slot it was writing. The next bundle for that slot
/// takes every chunk it shares with them from there, checked against its
/// own manifest, and fetches only the rest.
#[test]
fn an_interrupted_install_leaves_chunks_that_the_next_bundle_takes_in_place() {
    const CHUNKS: usize = LEN / (16 * 1024) + 1;
    let mut d = Device::new(Backend::Uboot);
    let v2 = perch_tests::device::new_image(1, LEN);
    build_image(&d, "v2.perch", 2, &v2);
    install_and_commit(&mut d, "v2.perch");
    // Release 3 shares nothing with release 2; its install into slot a is
    // killed after 8 chunks were written.
    let v3 = perch_tests::device::new_image(2, LEN);
    build_image(&d, "v3.perch", 3, &v3);
    let r = d.agent_env(&["install", "v3.perch"], &[("PERCH_FAILPOINT", "chunk-written:8")]);
    assert_eq!(r.code, -1, "not killed: {} {}", r.stdout, r.stderr);
    // Release 4 replaces it before it finished: release 3 with chunk 15
    // changed. Chunks 0..8 are on slot a already; at least those are not
    // fetched, and slot a ends up exactly release 4.
    let v4 = changed(&v3, 15 * 16 * 1024 + 3, 10);
    build_image(&d, "v4.perch", 4, &v4);
    let out = install_and_commit(&mut d, "v4.perch");
    let in_place = in_place_on(&out, "a");
    assert!((8..CHUNKS - 1).contains(&in_place), "{in_place} in place: {out}");
    assert!(out.contains(&format!("fetching {}", CHUNKS - in_place)), "{out}");
    assert_eq!(d.slot_bytes("a", LEN), v4);
    assert_eq!(d.slot_bytes("b", LEN), v2, "the running slot is untouched");
}

/// A bundle file cut short or padded is refused before anything is
/// staged, even when every chunk it lacks is on the device already (here
/// all but chunk 0 are on the running slot), so the file's own damage is
/// never hidden by delta reuse.
#[test]
fn a_cut_or_padded_bundle_file_is_refused_even_when_the_device_has_its_chunks() {
    let mut d = Device::new(Backend::Uboot);
    let v2 = perch_tests::device::new_image(1, LEN);
    build_image(&d, "v2.perch", 2, &v2);
    install_and_commit(&mut d, "v2.perch");
    let v3 = changed(&v2, 3, 10);
    build_image(&d, "v3.perch", 3, &v3);
    let good = fs::read(d.path("v3.perch")).unwrap();
    let mut padded = good.clone();
    padded.push(0);
    fs::write(d.path("cut.perch"), &good[..good.len() - 100]).unwrap();
    fs::write(d.path("padded.perch"), &padded).unwrap();
    let env_before = fs::read(d.path("env")).unwrap();
    for (file, needle) in [("cut.perch", "truncated"), ("padded.perch", "unexpected data after the payload")]
    {
        let r = d.agent(&["install", file]);
        assert_eq!(r.code, 3, "{file}: {} {}", r.stdout, r.stderr);
        assert!(r.stderr.contains(needle), "{file}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert_eq!(d.slot_bytes("b", LEN), v2, "{file}: the running slot changed");
        assert_eq!(fs::read(d.path("env")).unwrap(), env_before, "{file}: the bootloader env changed");
        assert_eq!(d.state(), "committed", "{file}: nothing was staged");
    }
    install_and_commit(&mut d, "v3.perch");
    assert_eq!(d.slot_bytes("a", LEN), v3);
}

/// How many chunks an install's output says were in place on `slot`.
fn in_place_on(out: &str, slot: &str) -> usize {
    out.split(&format!(" already in place on slot {slot}"))
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no chunks in place on slot {slot}: {out}"))
}

/// The same for a directory slot, whose staging file a new install keeps
/// (cut to the new payload's length) when a staging left it partly written.
#[test]
fn an_interrupted_archive_install_leaves_chunks_that_the_next_bundle_takes_in_place() {
    let d = Device::new(Backend::Dir);
    // Y is X with its last file changed and shorter: the staging file X
    // left is longer than Y's payload.
    let tree = |name: &str, last: u8, last_len: usize| {
        let dir = d.path(name);
        fs::create_dir_all(&dir).unwrap();
        for i in 0..10u8 {
            let (seed, len) = if i == 9 { (last, last_len) } else { (i + 1, 64 * 1024) };
            fs::write(dir.join(format!("f{i}")), perch_tests::device::new_image(seed, len)).unwrap();
        }
        dir
    };
    tree("x.tree", 10, 64 * 1024);
    let y = tree("y.tree", 11, 20 * 1024);
    d.build("x.perch", 2, "archive", "x.tree", 16 * 1024, &[]);
    d.build("y.perch", 3, "archive", "y.tree", 16 * 1024, &[]);
    let r = d.agent_env(&["install", "x.perch"], &[("PERCH_FAILPOINT", "chunk-written:6")]);
    assert_eq!(r.code, -1, "not killed: {} {}", r.stdout, r.stderr);
    let r = install(&d, "y.perch");
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(in_place_on(&r.stdout, "b") >= 6, "{}", r.stdout);
    assert_eq!(tree_digest(&d.path("root/b")), tree_digest(&y));
    let staged = fs::metadata(d.path("root/.staging-b.tar")).unwrap().len();
    let inspect = d.s.ok("perch", &["bundle", "inspect", "--json", "y.perch"]);
    let inspect: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(inspect["payload_len"].as_u64(), Some(staged), "the staged archive is exactly the payload");
}

#[test]
fn delta_install_reads_unchanged_chunks_from_the_running_slot_and_checks_each() {
    const CHUNKS: usize = LEN / (16 * 1024) + 1; // 19: the last one short
    let mut d = Device::new(Backend::Uboot);
    // The factory image has no record: release 2 is fetched whole.
    let v2 = perch_tests::device::new_image(1, LEN);
    build_image(&d, "v2.perch", 2, &v2);
    let out = install_and_commit(&mut d, "v2.perch");
    assert!(out.contains(&format!("0 chunks (0.0 MiB) reused from the device, {CHUNKS} chunks")), "{out}");
    assert!(fs::metadata(d.path("state/slots/b.head")).is_ok());

    // Release 3 changes 100 bytes in chunk 6: only that chunk is read from
    // the bundle; the others come from slot b and are checked against
    // release 3's manifest.
    let v3 = changed(&v2, 6 * 16 * 1024 + 10, 100);
    build_image(&d, "v3.perch", 3, &v3);
    let out = install_and_commit(&mut d, "v3.perch");
    assert!(out.contains(&format!("{} of {CHUNKS} chunks are on slot b", CHUNKS - 1)), "{out}");
    assert!(
        out.contains(&format!("{} chunks (0.2 MiB) reused from the device, 1 chunks", CHUNKS - 1)),
        "{out}"
    );
    assert_eq!(d.slot_bytes("a", LEN), v3);
    assert_eq!(d.slot_bytes("b", LEN), v2, "the slot read from is untouched");

    // The running slot's bytes changed under its record (a file system
    // mounted read-write): chunk 10 no longer matches, so it is fetched.
    // Release 4 changes chunk 2. The slot written is exactly release 4.
    let mut img = fs::read(d.path("a.img")).unwrap();
    img[10 * 16 * 1024 + 5] ^= 0xff;
    fs::write(d.path("a.img"), &img).unwrap();
    let v4 = changed(&v3, 2 * 16 * 1024, 7);
    build_image(&d, "v4.perch", 4, &v4);
    let out = install_and_commit(&mut d, "v4.perch");
    assert!(out.contains(&format!("{} of {CHUNKS} chunks are on slot a", CHUNKS - 1)), "{out}");
    // ...and the one that no longer matched was fetched instead.
    assert!(
        out.contains(&format!("{} chunks (0.2 MiB) reused from the device, 2 chunks", CHUNKS - 2)),
        "{out}"
    );
    assert_eq!(d.slot_bytes("b", LEN), v4);

    // A damaged record, and a record of another bundle: every chunk is
    // fetched, and the install is still exact.
    for (i, damage) in ["garbage", "other"].into_iter().enumerate() {
        let (running, target) = if i == 0 { ("b", "a") } else { ("a", "b") };
        let record = d.path(&format!("state/slots/{running}.head"));
        match damage {
            "garbage" => fs::write(&record, b"PERCHBDL not a head").unwrap(),
            // A whole bundle file starts with a valid head: release 4's.
            _ => fs::copy(d.path("v4.perch"), &record).map(drop).unwrap(),
        }
        let counter = 5 + i as u64;
        let v = changed(&v4, 12 * 16 * 1024, 1 + i);
        build_image(&d, "vn.perch", counter, &v);
        let out = install_and_commit(&mut d, "vn.perch");
        let said = if damage == "garbage" { "is damaged" } else { "is for another bundle" };
        assert!(out.contains(said) && out.contains("fetching every chunk"), "{damage}: {out}");
        assert_eq!(d.slot_bytes(target, LEN), v, "{damage}");
    }
}

/// Validly signed compressed chunks whose signed sizes lie: refused with
/// exit 3 before any byte reaches a slot, whichever way they lie.
#[test]
fn signed_compressed_chunks_whose_sizes_lie_exit_3_before_a_write() {
    use perch_protocol::bundle::{build_chunk, ChunkEntry, Chunking};
    const N: usize = 16 * 1024;
    let data: Vec<u8> = (0..N).map(|i| (i / 100) as u8).collect();
    let (entry, frame) = build_chunk(&data, Some(3)).unwrap();
    let frame = frame.expect("compressible");
    let ChunkEntry::Zstd { stored_hash, stored_len, hash, .. } = entry else { panic!("not compressed") };
    let hash_of = |b: &[u8]| *build_chunk(b, None).unwrap().0.hash();
    let junk = [frame.clone(), vec![0xAA; 5]].concat();
    let lying =
        |len: usize, hash: [u8; 32]| ChunkEntry::Zstd { stored_hash, stored_len, hash, len: len as u32 };
    type Case = (&'static str, ChunkEntry, Vec<u8>);
    let cases: [Case; 3] = [
        // Decompresses to more than the signed length (a bomb, in small).
        ("more than stated", lying(N - 100, hash_of(&data[..N - 100])), frame.clone()),
        // To fewer bytes than stated.
        ("fewer than stated", lying(N + 100, hash), frame.clone()),
        // Signed stored bytes with junk after the frame.
        (
            "junk after the frame",
            ChunkEntry::Zstd {
                stored_hash: hash_of(&junk),
                stored_len: junk.len() as u32,
                hash,
                len: N as u32,
            },
            junk.clone(),
        ),
    ];
    for (what, entry, stored) in cases {
        let d = Device::new(Backend::Uboot);
        let chunking = Chunking::Fixed { size: entry.len() };
        d.signed_chunks_bundle("bad.perch", 2, chunking, vec![entry], &stored);
        let trace = d.path("trace");
        let r = d.agent_env(&["install", "bad.perch"], &[("PERCH_TRACE", trace.to_str().unwrap())]);
        assert_eq!(r.code, 3, "{what}: {} {}", r.stdout, r.stderr);
        assert!(r.stderr.contains("do not decompress to its signed length"), "{what}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{what}: {}", r.stderr);
        let traced = fs::read_to_string(&trace).unwrap_or_default();
        assert!(!traced.lines().any(|l| l.starts_with("write ")), "{what}: a chunk was written: {traced}");
        assert_eq!(d.slot_bytes("b", SLOT_SIZE), vec![0u8; SLOT_SIZE], "{what}: slot b was written");
        assert_eq!(d.slot_bytes("a", SLOT_SIZE), old_image(), "{what}: the running slot changed");
        // `perch-agent check` refuses it the same way.
        let c = d.agent(&["check", "--trust", "org/trust.doc", "bad.perch"]);
        assert_eq!(c.code, 3, "{what}: check: {}", c.stderr);
    }
}

/// A signed linked chunk that was compressed against other bytes than the
/// chunks before it decodes to something that is not what was signed: the
/// install stops with exit 3, nothing of that chunk or after it reaches the
/// slot, and the running slot is untouched. With a frame checksum (what
/// `perch bundle build` makes) the decoder catches it; without one (older
/// bundles), the chunk's signed hash does.
#[test]
fn a_linked_chunk_that_decodes_wrong_exits_3_and_is_never_written() {
    use perch_protocol::bundle::{build_linked_chunk, ChunkEntry, Chunking};
    const N: usize = 16 * 1024;
    let block = perch_tests::device::new_image(4, N);
    let mut other = block.clone();
    other.rotate_left(1000);
    let raw = |b: &[u8]| build_linked_chunk(b, None, 0, &[]).unwrap().0;
    // Chunk 0 is the noise itself, stored raw; chunk 1 repeats it, but its
    // frame refers into `other`.
    let (entry, frame) = build_linked_chunk(&block, Some(3), N as u32, &other).unwrap();
    let summed = frame.unwrap();
    assert_ne!(summed[4] & 0x04, 0, "perch bundle build sets the frame checksum");
    // The same frame without its checksum: the descriptor's flag cleared
    // and the 4 bytes after the last block gone.
    let mut bare = summed[..summed.len() - 4].to_vec();
    bare[4] &= !0x04;
    for (what, frame) in [("checksummed frame", summed), ("frame without a checksum", bare)] {
        let ChunkEntry::ZstdLinked { window, .. } = entry else { panic!("{entry:?}") };
        let stored_hash = *build_linked_chunk(&frame, None, 0, &[]).unwrap().0.hash();
        let stored_len = frame.len() as u32;
        let wrong = ChunkEntry::ZstdLinked {
            window,
            stored_hash,
            stored_len,
            hash: *raw(&block).hash(),
            len: N as u32,
        };
        let d = Device::new(Backend::Uboot);
        let stored = [block.clone(), frame].concat();
        d.signed_chunks_bundle(
            "bad.perch",
            2,
            Chunking::Fixed { size: N as u32 },
            vec![raw(&block), wrong],
            &stored,
        );
        let trace = d.path("trace");
        let r = d.agent_env(&["install", "bad.perch"], &[("PERCH_TRACE", trace.to_str().unwrap())]);
        assert_eq!(r.code, 3, "{what}: {} {}", r.stdout, r.stderr);
        assert!(r.stderr.contains("chunk 1 of 2"), "{what}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{what}: {}", r.stderr);
        let traced = fs::read_to_string(&trace).unwrap_or_default();
        assert!(!traced.lines().any(|l| l == "write 1"), "{what}: chunk 1 was written: {traced}");
        assert_eq!(d.slot_bytes("a", SLOT_SIZE), old_image(), "{what}: the running slot changed");
        let c = d.agent(&["check", "--trust", "org/trust.doc", "bad.perch"]);
        assert_eq!(c.code, 3, "{what}: check: {}", c.stderr);
    }
}

/// Bundles built for agents older than format 3 still install, and a delta
/// from a format-2 release to a format-3 one reuses its chunks.
#[test]
fn format_2_bundles_still_install_and_serve_as_a_delta_source() {
    let mut d = Device::new(Backend::Uboot);
    let v2 = perch_tests::device::new_image(5, LEN);
    fs::write(d.path("v2.payload"), &v2).unwrap();
    d.build("v2.perch", 2, "image", "v2.payload", 16 * 1024, &["--format", "2"]);
    let inspect = d.s.ok("perch", &["bundle", "inspect", "--json", "v2.perch"]);
    assert!(inspect.stdout.contains("\"format\":2"), "{}", inspect.stdout);
    install_and_commit(&mut d, "v2.perch");
    assert_eq!(d.slot_bytes("b", LEN), v2);
    let v3 = changed(&v2, 3 * 16 * 1024, 10);
    build_image(&d, "v3.perch", 3, &v3);
    let out = install_and_commit(&mut d, "v3.perch");
    assert!(out.contains("18 of 19 chunks are on slot b"), "{out}");
    assert_eq!(d.slot_bytes("a", LEN), v3);
}
