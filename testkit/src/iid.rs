//! Signed instance identity documents, as instance metadata serves them
//! (`instance-identity/document` and its RSA-2048 PKCS#7 signature at
//! `instance-identity/rsa2048`), signed by a key the test holds instead of
//! AWS's. The message is written in BER with indefinite lengths and a
//! segmented content, the way AWS's signer writes it, so the verifier's
//! BER handling is exercised.
//!
//! Not responsible for verifying anything (the coordinator does).

use base64::Engine as _;
use rcgen::{CertificateParams, KeyPair, RsaKeySize, SigningKey as _, PKCS_RSA_SHA256};
use sha2::{Digest, Sha256};

const OID_DATA: &[u64] = &[1, 2, 840, 113_549, 1, 7, 1];
const OID_SIGNED_DATA: &[u64] = &[1, 2, 840, 113_549, 1, 7, 2];
const OID_CONTENT_TYPE: &[u64] = &[1, 2, 840, 113_549, 1, 9, 3];
const OID_MESSAGE_DIGEST: &[u64] = &[1, 2, 840, 113_549, 1, 9, 4];
const OID_SHA256: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 1];
const OID_RSA: &[u64] = &[1, 2, 840, 113_549, 1, 1, 1];

/// What to spoil in a signature, for tests of the verifier's refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    None,
    /// The signed message digest is not the content's.
    Digest,
}

/// A test stand-in for AWS's identity-document signing key.
pub struct IidSigner {
    key: KeyPair,
    certificate_pem: String,
    /// The certificate's issuer name and serial number, DER, which name
    /// the signer in the message.
    issuer_and_serial: Vec<u8>,
}

impl std::fmt::Debug for IidSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IidSigner").finish_non_exhaustive()
    }
}

impl IidSigner {
    /// A new RSA-2048 key and a self-signed certificate for it.
    ///
    /// # Panics
    /// When the crypto library cannot make a key (a broken build).
    #[allow(clippy::expect_used)] // test double: no way to go on without a key
    pub fn generate() -> Self {
        let key = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048)
            .expect("RSA key generation");
        let certificate = CertificateParams::new(Vec::<String>::new())
            .and_then(|params| params.self_signed(&key))
            .expect("self-signed certificate");
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate.der())
            .expect("the certificate rcgen made parses");
        let issuer_and_serial = tlv(
            0x30,
            &[
                parsed.tbs_certificate.issuer.as_raw().to_vec(),
                tlv(0x02, parsed.tbs_certificate.raw_serial()),
            ]
            .concat(),
        );
        Self {
            certificate_pem: certificate.pem(),
            key,
            issuer_and_serial,
        }
    }

    /// The certificate a verifier trusts, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The base64 PKCS#7 signature of `document`, as IMDS serves it.
    ///
    /// # Panics
    /// When signing fails (a broken build).
    #[allow(clippy::expect_used)]
    pub fn sign(&self, document: &[u8], tamper: Tamper) -> String {
        let digest = match tamper {
            Tamper::None => Sha256::digest(document).to_vec(),
            Tamper::Digest => Sha256::digest(b"another document").to_vec(),
        };
        let attributes = [
            tlv(
                0x30,
                &[oid(OID_CONTENT_TYPE), tlv(0x31, &oid(OID_DATA))].concat(),
            ),
            tlv(
                0x30,
                &[oid(OID_MESSAGE_DIGEST), tlv(0x31, &tlv(0x04, &digest))].concat(),
            ),
        ]
        .concat();
        let signature = self.key.sign(&tlv(0x31, &attributes)).expect("signing");
        let algorithm = |id| tlv(0x30, &[oid(id), vec![0x05, 0x00]].concat());
        let signer = tlv(
            0x30,
            &[
                tlv(0x02, &[1]),
                self.issuer_and_serial.clone(),
                algorithm(OID_SHA256),
                tlv(0xa0, &attributes),
                algorithm(OID_RSA),
                tlv(0x04, &signature),
            ]
            .concat(),
        );
        // The content in two segments of a constructed OCTET STRING.
        let middle = document.len() / 2;
        let content = indefinite(
            0x24,
            &[
                tlv(0x04, &document[..middle]),
                tlv(0x04, &document[middle..]),
            ]
            .concat(),
        );
        let encapsulated = indefinite(0x30, &[oid(OID_DATA), indefinite(0xa0, &content)].concat());
        let signed_data = indefinite(
            0x30,
            &[
                tlv(0x02, &[1]),
                tlv(0x31, &algorithm(OID_SHA256)),
                encapsulated,
                tlv(0x31, &signer),
            ]
            .concat(),
        );
        let message = indefinite(
            0x30,
            &[oid(OID_SIGNED_DATA), indefinite(0xa0, &signed_data)].concat(),
        );
        base64::engine::general_purpose::STANDARD.encode(message)
    }
}

/// An identity document as IMDS serves it, for `instance` in `region`,
/// launched at `pending`.
pub fn document(instance: &str, region: &str, pending: std::time::SystemTime) -> String {
    let pending = humantime::format_rfc3339_seconds(pending).to_string();
    serde_json::to_string_pretty(&serde_json::json!({
        "accountId": "123456789012",
        "architecture": "x86_64",
        "availabilityZone": format!("{region}a"),
        "billingProducts": null,
        "devpayProductCodes": null,
        "marketplaceProductCodes": null,
        "imageId": "ami-0123456789abcdef0",
        "instanceId": instance,
        "instanceType": "m5.large",
        "kernelId": null,
        "pendingTime": pending,
        "privateIp": "10.0.0.10",
        "ramdiskId": null,
        "region": region,
        "version": "2017-09-30",
    }))
    .unwrap_or_default()
}

/// A DER element with a definite length.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(u8::try_from(len).unwrap_or(0));
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | u8::try_from(bytes.len()).unwrap_or(0));
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// A BER element with an indefinite length, ended by two zero bytes.
fn indefinite(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, 0x80];
    out.extend_from_slice(content);
    out.extend([0, 0]);
    out
}

fn oid(arcs: &[u64]) -> Vec<u8> {
    let mut body = vec![u8::try_from(arcs[0] * 40 + arcs[1]).unwrap_or(0)];
    for &arc in &arcs[2..] {
        let mut groups = vec![u8::try_from(arc & 0x7f).unwrap_or(0)];
        let mut rest = arc >> 7;
        while rest > 0 {
            groups.push(0x80 | u8::try_from(rest & 0x7f).unwrap_or(0));
            rest >>= 7;
        }
        groups.reverse();
        body.extend(groups);
    }
    tlv(0x06, &body)
}
