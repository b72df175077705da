//! Just enough DER to read the agent's own client certificate: the subject's
//! common name (the agent id the coordinator chose), the validity window and
//! the public key.
//!
//! Not a general X.509 parser and not a verifier: the coordinator verifies
//! the certificate; the agent only needs to know who it is, when to renew,
//! and that the certificate carries the key it generated.

/// DER tags used below (X.690 §8, RFC 5280 §4.1).
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_IA5_STRING: u8 = 0x16;
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT Version` at the start of a v3 `TBSCertificate`.
const TAG_VERSION: u8 = 0xa0;
/// Content octets of the `id-at-commonName` OID, 2.5.4.3.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// Longest length prefix we accept: four octets, far more than a certificate needs.
const MAX_LENGTH_OCTETS: usize = 4;
/// RFC 5280 §4.1.2.5.1: two-digit UTCTime years from 50 mean 19YY.
const UTC_TIME_CENTURY_PIVOT: i64 = 50;

/// What the agent reads from its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CertSummary {
    /// Subject common name.
    pub common_name: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// The subject public key (contents of the `subjectPublicKey` BIT STRING
    /// without its unused-bits octet).
    pub public_key: Vec<u8>,
}

/// Reads a DER `Certificate`. Returns `None` for anything malformed or
/// without a common name.
pub(super) fn summarize(cert_der: &[u8]) -> Option<CertSummary> {
    let mut outer = Reader::new(cert_der);
    let certificate = outer.expect(TAG_SEQUENCE)?;
    let mut cert = Reader::new(certificate);
    let mut tbs = Reader::new(cert.expect(TAG_SEQUENCE)?);
    if tbs.peek_tag() == Some(TAG_VERSION) {
        tbs.next()?;
    }
    tbs.expect(TAG_INTEGER)?; // serialNumber
    tbs.expect(TAG_SEQUENCE)?; // signature algorithm
    tbs.expect(TAG_SEQUENCE)?; // issuer
    let mut validity = Reader::new(tbs.expect(TAG_SEQUENCE)?);
    let not_before = read_time(&mut validity)?;
    let not_after = read_time(&mut validity)?;
    let common_name = common_name(tbs.expect(TAG_SEQUENCE)?)?;
    let mut spki = Reader::new(tbs.expect(TAG_SEQUENCE)?);
    spki.expect(TAG_SEQUENCE)?; // algorithm
    let bits = spki.expect(TAG_BIT_STRING)?;
    let (&unused_bits, public_key) = bits.split_first()?;
    if unused_bits != 0 {
        return None;
    }
    Some(CertSummary {
        common_name,
        not_before,
        not_after,
        public_key: public_key.to_vec(),
    })
}

/// The first common name in a `Name` (a SEQUENCE OF SET OF
/// AttributeTypeAndValue).
fn common_name(name: &[u8]) -> Option<String> {
    let mut rdns = Reader::new(name);
    while !rdns.is_empty() {
        let mut set = Reader::new(rdns.expect(TAG_SET)?);
        while !set.is_empty() {
            let mut attribute = Reader::new(set.expect(TAG_SEQUENCE)?);
            let oid = attribute.expect(TAG_OID)?;
            let (tag, value) = attribute.next()?;
            if oid == OID_COMMON_NAME
                && matches!(tag, TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING)
            {
                return std::str::from_utf8(value).ok().map(str::to_owned);
            }
        }
    }
    None
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), as
/// Unix seconds. RFC 5280 requires exactly these forms.
fn read_time(reader: &mut Reader<'_>) -> Option<i64> {
    let (tag, value) = reader.next()?;
    let text = std::str::from_utf8(value).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match tag {
        TAG_UTC_TIME if digits.len() == 12 => {
            let yy: i64 = digits[..2].parse().ok()?;
            let year = if yy >= UTC_TIME_CENTURY_PIVOT {
                1900 + yy
            } else {
                2000 + yy
            };
            (year, &digits[2..])
        }
        TAG_GENERALIZED_TIME if digits.len() == 14 => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Walks the elements of one DER constructed value.
struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(input: &'a [u8]) -> Self {
        Self { input }
    }

    fn is_empty(&self) -> bool {
        self.input.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.input.first().copied()
    }

    /// The next element's tag and contents.
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.input.split_first()?;
        // High tag numbers (low five bits all set) never occur in the
        // fields we read.
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first & 0x80 == 0 {
            usize::from(first)
        } else {
            let octets = usize::from(first & 0x7f);
            if octets == 0 || octets > MAX_LENGTH_OCTETS || rest.len() < octets {
                return None;
            }
            let (len_bytes, after) = rest.split_at(octets);
            rest = after;
            len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        if rest.len() < len {
            return None;
        }
        let (content, after) = rest.split_at(len);
        self.input = after;
        Some((tag, content))
    }

    /// The next element's contents, if it has this tag.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (t, content) if t == tag => Some(content),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn civil_dates_map_to_unix_days() {
        let cases = [
            ((1970, 1, 1), 0),
            ((2000, 3, 1), 11_017),
            ((2024, 2, 29), 19_782),
            ((2049, 12, 31), 29_219),
            ((1969, 12, 31), -1),
        ];
        for ((y, m, d), days) in cases {
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn both_time_forms_parse() {
        let utc = [
            TAG_UTC_TIME,
            13,
            b'2',
            b'4',
            b'0',
            b'2',
            b'2',
            b'9',
            b'1',
            b'2',
            b'3',
            b'4',
            b'5',
            b'6',
            b'Z',
        ];
        assert_eq!(
            read_time(&mut Reader::new(&utc)),
            Some(19_782 * 86_400 + 12 * 3_600 + 34 * 60 + 56)
        );
        let generalized = b"\x18\x0f20500101000000Z";
        assert_eq!(
            read_time(&mut Reader::new(generalized)),
            Some(days_from_civil(2050, 1, 1) * 86_400)
        );
        let no_zone = b"\x17\x0c240229123456";
        assert_eq!(read_time(&mut Reader::new(no_zone)), None);
    }

    #[test]
    fn reads_an_rcgen_certificate() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Servitor");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "build-box-a1b2c3");
        params.not_before = rcgen::date_time_ymd(2024, 2, 29);
        params.not_after = rcgen::date_time_ymd(2051, 6, 1);
        let cert = params.self_signed(&key).unwrap();
        let summary = summarize(cert.der()).unwrap();
        assert_eq!(summary.common_name, "build-box-a1b2c3");
        assert_eq!(summary.not_before, days_from_civil(2024, 2, 29) * 86_400);
        assert_eq!(summary.not_after, days_from_civil(2051, 6, 1) * 86_400);
        assert_eq!(summary.public_key, key.public_key_raw());
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(summarize(b""), None);
        assert_eq!(summarize(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(summarize(&[0x30, 0x03, 0x02, 0x01]), None);
    }
}
