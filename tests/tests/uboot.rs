//! The shipped U-Boot boot scripts in real U-Boot (qemu's `virt` board,
//! Debian's u-boot-qemu), for both drone classes: every state the agent can
//! leave in the environment boots the slot the model says, loads that
//! slot's kernel, and counts and falls back the same way. The crash tests
//! reboot through the model; the deploy tests through real U-Boot.

use perch_tests::device::{boot_cmd, uboot_model};
use perch_tests::uboot::{Arch, Board};
use perch_tests::Scratch;

#[test]
fn every_state_boots_as_the_model_says_in_real_uboot() {
    let s = Scratch::new();
    let slots = [None, Some("a"), Some("b")];
    let upgrades = [None, Some("0"), Some("1")];
    let counts = [None, Some("0"), Some("1"), Some("2"), Some("3"), Some("8"), Some("9")];
    let limits = [None, Some("1"), Some("2"), Some("3"), Some("9")];
    let mut cases = vec![];
    for slot in slots {
        for upgrade in upgrades {
            for count in counts {
                for limit in limits {
                    cases.push([
                        ("perch_slot", slot),
                        ("upgrade_available", upgrade),
                        ("bootcount", count),
                        ("bootlimit", limit),
                    ]);
                }
            }
        }
    }
    let scenarios: Vec<Vec<(&str, &str)>> =
        cases.iter().map(|c| c.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect()).collect();
    for arch in Arch::ALL {
        let board = Board::new(arch, &boot_cmd(arch), &s.path("")).unwrap();
        let got = board.run_scenarios(&scenarios, &["perch_slot", "upgrade_available", "bootcount"]).unwrap();
        for (case, real) in cases.iter().zip(&got) {
            let [slot, upgrade, count, limit] = case.map(|(_, v)| v);
            let model = uboot_model(slot, upgrade, count, limit);
            let what = format!("{arch:?} {case:?}");
            assert_eq!(real.slot(), Some(model.slot.as_str()), "{what}: booted slot ({real:?})");
            assert_eq!(real.kernel, model.slot.chars().next(), "{what}: kernel loaded from the other slot");
            assert!(
                real.bootargs.contains(&format!("root=PARTLABEL=rootfs-{}", model.slot)),
                "{what}: {}",
                real.bootargs
            );
            assert_eq!(real.var("perch_slot"), Some(model.slot.as_str()), "{what}");
            assert_eq!(real.var("upgrade_available").unwrap_or_default(), model.upgrade_available, "{what}");
            assert_eq!(real.var("bootcount").unwrap_or_default(), model.bootcount, "{what}");
        }
        eprintln!("{arch:?}: {} environment states booted as the model says", got.len());
    }
}
