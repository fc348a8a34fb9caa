//! The CRC-32 (IEEE, as zlib and Ethernet use it) that frames the journal
//! and the outbox records on disk.
//!
//! One 1 KiB table, built at compile time: the records are small and rare,
//! and crc32fast's slice-by-16 tables cost the static agent 24 KB.

const CRC32: crc::Crc<u32, crc::Table<1>> = crc::Crc::<u32, crc::Table<1>>::new(&crc::CRC_32_ISO_HDLC);

/// CRC-32 of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    CRC32.checksum(bytes)
}

#[cfg(test)]
mod tests {
    use super::crc32;

    #[test]
    fn is_the_ieee_crc_that_framed_records_before() {
        // The check value of CRC-32/ISO-HDLC, and a record framed by
        // crc32fast before the switch: existing journals and outboxes still read.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"perch journal"), 0xDBE9_0C86);
    }
}
