# perch A/B boot for an armv7 drone, with boot counting in the script
# (for boards built without CONFIG_BOOTCOUNT_ENV). Build the image U-Boot
# loads with:
#   mkimage -A arm -T script -C none -n "perch A/B boot" -d boot.cmd boot.scr
#
# The agent sets perch_slot, upgrade_available=1 and bootcount=0 when it
# activates a new slot, and upgrade_available=0 when the slot passed its
# trial. While upgrade_available is 1 every boot counts; past bootlimit
# this script switches perch_slot back to the other slot for good, and the
# agent reports the bootloader fallback as a rollback (boot_fallback).
# The kernel command line says which slot booted (perch.slot=), so the
# agent never has to guess.
#
# Board specifics to check: devtype/devnum (the boot medium), the
# partitions (perch_part_a / perch_part_b), the kernel and FDT file names,
# and that the board's environment sets kernel_addr_r, fdt_addr_r and
# fdtfile.
#
# tests/tests/uboot.rs runs this script in real U-Boot (qemu's virt board)
# for every state the agent can leave in the environment.

if test -z "${perch_slot}"; then setenv perch_slot a; fi
if test -z "${bootlimit}"; then setenv bootlimit 3; fi
if test -z "${perch_part_a}"; then setenv perch_part_a 2; fi
if test -z "${perch_part_b}"; then setenv perch_part_b 3; fi

if test "${upgrade_available}" = "1"; then
    if test -z "${bootcount}"; then setenv bootcount 0; fi
    setexpr bootcount ${bootcount} + 1
    if itest ${bootcount} -gt ${bootlimit}; then
        echo "perch: slot ${perch_slot} did not confirm in ${bootlimit} boots; falling back"
        if test "${perch_slot}" = "a"; then setenv perch_slot b; else setenv perch_slot a; fi
        setenv upgrade_available 0
        setenv bootcount 0
    fi
    saveenv
fi

if test "${perch_slot}" = "b"; then setenv perch_part ${perch_part_b}; else setenv perch_part ${perch_part_a}; fi
setenv bootargs "${bootargs} root=PARTLABEL=rootfs-${perch_slot} rootwait ro perch.slot=${perch_slot}"
echo "perch: booting slot ${perch_slot} (partition ${perch_part}, boot ${bootcount} of ${bootlimit})"
load ${devtype} ${devnum}:${perch_part} ${kernel_addr_r} /boot/zImage
load ${devtype} ${devnum}:${perch_part} ${fdt_addr_r} /boot/dtbs/${fdtfile}
bootz ${kernel_addr_r} - ${fdt_addr_r}
