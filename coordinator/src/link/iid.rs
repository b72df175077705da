//! Instance identity documents: proof, without any shared secret, that an
//! enrolling agent runs on a given EC2 instance. The agent sends the
//! document and its RSA-2048 PKCS#7 signature as instance metadata gives
//! them (`instance-identity/document`, `instance-identity/rsa2048`); this
//! module checks that AWS's certificate for the document's Region signed
//! it, that the signed content is that very document, and that it is fresh,
//! as SPIRE's `aws_iid` attestor does.
//!
//! Not responsible for whether the instance belongs to the group the
//! coordinator sizes, nor for refusing a second enrollment of one instance
//! (the enroller asks the fleet and the store).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use x509_parser::der_parser::asn1_rs::{Any, Class, FromBer, Oid, Tag};

/// The certificates shipped with the coordinator, from AWS's documentation.
pub const DEFAULT_CERTIFICATES: &str = include_str!("../../aws/iid-rsa2048-certificates.pem");
/// Where [`DEFAULT_CERTIFICATES`] come from, for messages.
pub const DEFAULT_CERTIFICATES_SOURCE: &str =
    "the coordinator's built-in AWS RSA-2048 certificates (docs.aws.amazon.com/AWSEC2/latest/UserGuide/regions-certs.html)";

const OID_SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
const OID_MESSAGE_DIGEST: &str = "1.2.840.113549.1.9.4";
const OID_SHA256: &str = "2.16.840.1.101.3.4.2.1";

/// Why a document was not accepted; each names the check that failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IidError {
    #[error("the identity document is not the JSON instance metadata gives ({0})")]
    Document(String),
    #[error("the identity signature is not a PKCS#7 signed-data message ({0})")]
    Malformed(String),
    #[error("no AWS certificate is configured for region {0:?}; add it to agents.aws_iid.certificates_file")]
    UnknownRegion(String),
    #[error("the identity signature does not verify with AWS's certificate for region {region}: the document was not signed by AWS, or was changed")]
    BadSignature { region: String },
    #[error(
        "the signed content is not the identity document sent with it: the document was swapped"
    )]
    ContentMismatch,
    #[error("the identity document is {age_secs} s old (instance launched at {pending_time}), over the {max_secs} s allowed for enrollment; an instance enrolls once, when it boots")]
    Stale {
        age_secs: u64,
        max_secs: u64,
        pending_time: String,
    },
}

/// What a verified document says about the instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceIdentity {
    pub instance_id: String,
    pub region: String,
    pub account_id: String,
    pub availability_zone: String,
    pub instance_type: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    instance_id: String,
    region: String,
    #[serde(default)]
    account_id: String,
    #[serde(default)]
    availability_zone: String,
    #[serde(default)]
    instance_type: String,
    pending_time: String,
}

/// Verifies identity documents against a set of AWS certificates.
#[derive(Clone, Debug)]
pub struct IidVerifier {
    /// Region → the certificate's RSA public key (PKCS#1 DER).
    keys: HashMap<String, Vec<u8>>,
    /// How long after the instance's launch it may enroll.
    max_age: Duration,
}

impl IidVerifier {
    /// A verifier over certificates in the shipped format (a line
    /// `region: <name>` before each PEM certificate; `#` comments).
    ///
    /// # Errors
    /// A message naming `source` and the entry that is wrong.
    pub fn from_pem_set(text: &str, source: &str, max_age: Duration) -> Result<Self, String> {
        let mut keys = HashMap::new();
        let mut region: Option<String> = None;
        let mut pem: Option<String> = None;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(block) = &mut pem {
                block.push_str(line);
                block.push('\n');
                if line.starts_with("-----END CERTIFICATE-----") {
                    let name = region.take().ok_or_else(|| {
                        format!("{source}: the certificate ending on line {} has no `region:` line before it", number + 1)
                    })?;
                    let key = public_key(block)
                        .map_err(|e| format!("{source}: the certificate for {name}: {e}"))?;
                    keys.insert(name, key);
                    pem = None;
                }
            } else if line.starts_with("-----BEGIN CERTIFICATE-----") {
                pem = Some(format!("{line}\n"));
            } else if let Some(name) = line.strip_prefix("region:") {
                region = Some(name.trim().to_owned());
            } else if !line.is_empty() && !line.starts_with('#') {
                return Err(format!(
                    "{source} line {}: expected `region: <name>`, a PEM certificate or a # comment",
                    number + 1
                ));
            }
        }
        if keys.is_empty() {
            return Err(format!("{source} holds no certificate"));
        }
        Ok(Self { keys, max_age })
    }

    /// The shipped AWS certificates.
    pub fn aws(max_age: Duration) -> Self {
        // The shipped file is checked by a test; a broken one is a bug.
        Self::from_pem_set(DEFAULT_CERTIFICATES, DEFAULT_CERTIFICATES_SOURCE, max_age)
            .unwrap_or_else(|e| panic!("built-in certificates: {e}"))
    }

    /// The Regions this verifier has a certificate for, sorted.
    pub fn regions(&self) -> Vec<&str> {
        let mut regions: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        regions.sort_unstable();
        regions
    }

    /// Checks `document` and its base64 PKCS#7 signature `pkcs7`, as
    /// instance metadata serves them, at time `now`.
    ///
    /// # Errors
    /// [`IidError`], naming the check that failed.
    pub fn verify(
        &self,
        document: &[u8],
        pkcs7: &str,
        now: SystemTime,
    ) -> Result<InstanceIdentity, IidError> {
        let parsed: Document =
            serde_json::from_slice(document).map_err(|e| IidError::Document(e.to_string()))?;
        let key = self
            .keys
            .get(&parsed.region)
            .ok_or_else(|| IidError::UnknownRegion(parsed.region.clone()))?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(pkcs7.split_whitespace().collect::<String>())
            .map_err(|e| IidError::Malformed(format!("not base64: {e}")))?;
        let signed = SignedMessage::parse(&der).map_err(IidError::Malformed)?;
        let message = match &signed.signed_attributes {
            Some(attributes) => {
                let digest = attributes.message_digest.as_deref().ok_or_else(|| {
                    IidError::Malformed("signed attributes without a message digest".into())
                })?;
                if digest != Sha256::digest(&signed.content).as_slice() {
                    return Err(IidError::BadSignature {
                        region: parsed.region,
                    });
                }
                attributes.der.clone()
            }
            None => signed.content.clone(),
        };
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key)
            .verify(&message, &signed.signature)
            .map_err(|_| IidError::BadSignature {
                region: parsed.region.clone(),
            })?;
        if signed.content != document {
            return Err(IidError::ContentMismatch);
        }
        let pending = humantime::parse_rfc3339(&parsed.pending_time).map_err(|e| {
            IidError::Document(format!("pendingTime {:?}: {e}", parsed.pending_time))
        })?;
        let age = now.duration_since(pending).unwrap_or_default();
        if age > self.max_age {
            return Err(IidError::Stale {
                age_secs: age.as_secs(),
                max_secs: self.max_age.as_secs(),
                pending_time: parsed.pending_time,
            });
        }
        Ok(InstanceIdentity {
            instance_id: parsed.instance_id,
            region: parsed.region,
            account_id: parsed.account_id,
            availability_zone: parsed.availability_zone,
            instance_type: parsed.instance_type,
        })
    }
}

/// The RSA public key of a PEM certificate.
fn public_key(pem: &str) -> Result<Vec<u8>, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// The parts of a PKCS#7 signed-data message a verification needs.
struct SignedMessage {
    content: Vec<u8>,
    signed_attributes: Option<SignedAttributes>,
    signature: Vec<u8>,
}

struct SignedAttributes {
    /// Their DER encoding as a SET, which is what the signature covers.
    der: Vec<u8>,
    message_digest: Option<Vec<u8>>,
}

/// One element, or a message naming what was expected.
fn element<'a>(bytes: &'a [u8], what: &str) -> Result<(Any<'a>, &'a [u8]), String> {
    Any::from_ber(bytes)
        .map(|(rest, any)| (any, rest))
        .map_err(|e| format!("{what}: {e}"))
}

/// The elements inside a constructed element.
fn children<'a>(any: &Any<'a>, what: &str) -> Result<Vec<Any<'a>>, String> {
    let mut rest = any.data;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (child, next) = element(rest, what)?;
        out.push(child);
        rest = next;
    }
    Ok(out)
}

fn oid_of(any: &Any<'_>) -> Option<String> {
    Oid::try_from(any.clone())
        .ok()
        .map(|oid| oid.to_id_string())
}

/// An OCTET STRING's bytes, joined from its segments when BER split it.
fn octets(any: &Any<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    if any.tag() != Tag::OctetString {
        return Err("expected an OCTET STRING".into());
    }
    if any.header.is_constructed() {
        for child in children(any, "an OCTET STRING segment")? {
            octets(&child, out)?;
        }
    } else {
        out.extend_from_slice(any.data);
    }
    Ok(())
}

fn context(any: &Any<'_>, number: u32) -> bool {
    any.class() == Class::ContextSpecific && any.tag().0 == number
}

impl SignedMessage {
    fn parse(der: &[u8]) -> Result<Self, String> {
        let (content_info, _) = element(der, "ContentInfo")?;
        let parts = children(&content_info, "ContentInfo")?;
        let [kind, explicit, ..] = parts.as_slice() else {
            return Err("ContentInfo is too short".into());
        };
        if oid_of(kind).as_deref() != Some(OID_SIGNED_DATA) {
            return Err("it is not signed-data".into());
        }
        let signed_data = children(explicit, "the signed-data wrapper")?
            .into_iter()
            .next()
            .ok_or("empty signed-data")?;
        let fields = children(&signed_data, "SignedData")?;
        // version, digestAlgorithms, encapContentInfo, [0] certificates,
        // [1] crls, signerInfos.
        let encap = fields.get(2).ok_or("SignedData has no content")?;
        let signer_infos = fields.last().ok_or("SignedData has no signers")?;
        let encap_fields = children(encap, "EncapsulatedContentInfo")?;
        let wrapped = encap_fields
            .get(1)
            .filter(|f| context(f, 0))
            .ok_or("the signed content is detached")?;
        let mut content = Vec::new();
        for part in children(wrapped, "the signed content")? {
            octets(&part, &mut content)?;
        }
        let signers = children(signer_infos, "SignerInfos")?;
        let [signer] = signers.as_slice() else {
            return Err(format!("{} signers; AWS signs with one", signers.len()));
        };
        let signer_fields = children(signer, "SignerInfo")?;
        // version, sid, digestAlgorithm, [0] signedAttrs?, signatureAlgorithm,
        // signature, [1] unsignedAttrs?
        let digest_algorithm = signer_fields.get(2).ok_or("SignerInfo is too short")?;
        let algorithm = children(digest_algorithm, "the digest algorithm")?;
        if algorithm.first().and_then(oid_of).as_deref() != Some(OID_SHA256) {
            return Err("the digest algorithm is not SHA-256".into());
        }
        let mut rest = &signer_fields[3..];
        let signed_attributes = match rest.first() {
            Some(first) if context(first, 0) => {
                rest = &rest[1..];
                Some(SignedAttributes::parse(first)?)
            }
            _ => None,
        };
        let signature = rest.get(1).ok_or("SignerInfo has no signature")?;
        let mut bytes = Vec::new();
        octets(signature, &mut bytes)?;
        Ok(Self {
            content,
            signed_attributes,
            signature: bytes,
        })
    }
}

impl SignedAttributes {
    fn parse(implicit: &Any<'_>) -> Result<Self, String> {
        let mut message_digest = None;
        for attribute in children(implicit, "the signed attributes")? {
            let parts = children(&attribute, "a signed attribute")?;
            if parts.first().and_then(oid_of).as_deref() == Some(OID_MESSAGE_DIGEST) {
                let values = parts.get(1).ok_or("a message digest without a value")?;
                let value = children(values, "the message digest")?
                    .into_iter()
                    .next()
                    .ok_or("an empty message digest")?;
                let mut digest = Vec::new();
                octets(&value, &mut digest)?;
                message_digest = Some(digest);
            }
        }
        // The signature covers the attributes as a DER SET OF, not with
        // their [0] IMPLICIT tag.
        let mut der = vec![0x31];
        der.extend(der_length(implicit.data.len()));
        der.extend_from_slice(implicit.data);
        Ok(Self {
            der,
            message_digest,
        })
    }
}

/// A DER length.
fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![u8::try_from(len).unwrap_or(0)];
    }
    let bytes: Vec<u8> = len
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    let mut out = vec![0x80 | u8::try_from(bytes.len()).unwrap_or(0)];
    out.extend(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use servitor_testkit::iid::{IidSigner, Tamper};

    const MAX_AGE: Duration = Duration::from_secs(600);

    fn document(instance: &str, region: &str, pending: SystemTime) -> Vec<u8> {
        servitor_testkit::iid::document(instance, region, pending).into_bytes()
    }

    fn verifier(signer: &IidSigner, region: &str) -> IidVerifier {
        let set = format!("region: {region}\n{}", signer.certificate_pem());
        IidVerifier::from_pem_set(&set, "test", MAX_AGE).unwrap()
    }

    #[test]
    fn the_shipped_certificates_cover_the_commercial_regions() {
        let verifier = IidVerifier::aws(MAX_AGE);
        let regions = verifier.regions();
        for region in [
            "us-east-1",
            "us-west-2",
            "eu-west-1",
            "eu-central-1",
            "ap-northeast-1",
        ] {
            assert!(regions.contains(&region), "{regions:?}");
        }
        assert!(regions.len() >= 30, "{regions:?}");
    }

    #[test]
    fn a_document_signed_for_its_region_is_accepted() {
        let signer = IidSigner::generate();
        let now = SystemTime::now();
        let doc = document("i-0abc", "eu-west-1", now - Duration::from_secs(30));
        let pkcs7 = signer.sign(&doc, Tamper::None);
        let identity = verifier(&signer, "eu-west-1")
            .verify(&doc, &pkcs7, now)
            .unwrap();
        assert_eq!(identity.instance_id, "i-0abc");
        assert_eq!(identity.region, "eu-west-1");
    }

    #[test]
    fn each_forgery_is_refused_naming_the_check() {
        let signer = IidSigner::generate();
        let now = SystemTime::now();
        let doc = document("i-0abc", "eu-west-1", now - Duration::from_secs(30));
        let verifier = verifier(&signer, "eu-west-1");

        // Changed after signing.
        let tampered = String::from_utf8(doc.clone())
            .unwrap()
            .replace("i-0abc", "i-0evil")
            .into_bytes();
        let pkcs7 = signer.sign(&doc, Tamper::None);
        assert_eq!(
            verifier.verify(&tampered, &pkcs7, now),
            Err(IidError::ContentMismatch)
        );
        // Signed by another key.
        let other = IidSigner::generate();
        assert!(matches!(
            verifier.verify(&doc, &other.sign(&doc, Tamper::None), now),
            Err(IidError::BadSignature { .. })
        ));
        // A signature whose content digest is not the content's.
        assert!(matches!(
            verifier.verify(&doc, &signer.sign(&doc, Tamper::Digest), now),
            Err(IidError::BadSignature { .. })
        ));
        // A region with no certificate.
        let elsewhere = document("i-0abc", "mars-north-1", now);
        assert_eq!(
            verifier.verify(&elsewhere, &signer.sign(&elsewhere, Tamper::None), now),
            Err(IidError::UnknownRegion("mars-north-1".into()))
        );
        // Too old.
        let old = document("i-0abc", "eu-west-1", now - Duration::from_secs(3600));
        let err = verifier
            .verify(&old, &signer.sign(&old, Tamper::None), now)
            .unwrap_err();
        assert!(
            matches!(err, IidError::Stale { max_secs: 600, .. }),
            "{err}"
        );
        // Not PKCS#7 at all.
        assert!(matches!(
            verifier.verify(&doc, "bm90IHBrY3M3", now),
            Err(IidError::Malformed(_))
        ));
    }

    #[test]
    fn a_bad_certificate_set_names_its_line() {
        let err =
            IidVerifier::from_pem_set("region us-east-1\n", "certs.pem", MAX_AGE).unwrap_err();
        assert!(err.contains("certs.pem line 1"), "{err}");
        let err = IidVerifier::from_pem_set("# nothing\n", "certs.pem", MAX_AGE).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
    }
}
