//! Domain errors to gRPC statuses, in one place: the code each error asks for ([`ApiError`]), a message bounded
//! in size, and every field problem as `google.rpc.BadRequest` details ([`status`]).
//!
//! Bounded, because a caller controls what an error quotes (a 1 MiB label value, a spec with 200 disks) and gRPC
//! clients refuse a reply whose metadata passes 8-16 KiB: the client would see RESOURCE_EXHAUSTED ("metadata size
//! exceeds hard limit") instead of the reason. The message and the details both travel in the trailers
//! (`grpc-message`, percent-encoded; `grpc-status-details-bin`, base64 of a `google.rpc.Status` that repeats the
//! message), so each has a budget: [`MAX_MESSAGE`] bytes of message, [`DETAILS_BUDGET`] bytes of violations.

use std::borrow::Cow;

use qx_common::{error_chain, shorten, FieldError, ValidationErrors};
use qx_vmm::VmError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::certs::CertError;
use crate::host::update::UpdateError;
use crate::host::HostError;
use crate::network::NetworkError;
use crate::security_groups::SecurityGroupError;
use crate::volumes::VolumeError;

/// The longest `grpc-message`, in bytes before percent-encoding (at most three times this after).
pub const MAX_MESSAGE: usize = 1024;
/// How many bytes of field violations the details carry at most (before base64); violations past it are counted
/// in a last one.
pub const DETAILS_BUDGET: usize = 2048;

/// An error a gRPC handler can answer with.
pub trait ApiError: std::error::Error + 'static {
    /// The status code for this error.
    fn code(&self) -> Code;
    /// The request's fields this error is about, each with its problem; empty when it is not about fields.
    fn problems(&self) -> Cow<'_, [FieldError]> {
        Cow::Borrowed(&[])
    }
}

/// `error` as a gRPC status: its code, its message with its causes (bounded), and, when it names fields, a
/// `BadRequest` (INVALID_ARGUMENT) or `PreconditionFailure` (other codes) with a violation per field problem.
pub fn status<E: ApiError>(error: E) -> Status {
    let message = error_chain(&error);
    to_status(error.code(), &message, &error.problems())
}

/// A status of `code` with `message` cut to [`MAX_MESSAGE`] and `problems` as details, within [`DETAILS_BUDGET`].
pub fn to_status(code: Code, message: &str, problems: &[FieldError]) -> Status {
    let message = bounded_message(message);
    if problems.is_empty() {
        return Status::new(code, message);
    }
    let mut details = ErrorDetails::new();
    let mut used = 0;
    let mut shown = 0;
    let mut violations = Vec::new();
    for problem in problems {
        let (field, description) = (problem.shown_field(), problem.without_field());
        // Each violation costs its two strings and a few bytes of protobuf framing.
        let cost = field.len() + description.len() + 8;
        if shown > 0 && used + cost > DETAILS_BUDGET {
            break;
        }
        used += cost;
        shown += 1;
        violations.push((field, description));
    }
    let more = problems.len() - shown;
    if code == Code::InvalidArgument {
        let mut list: Vec<FieldViolation> = violations.into_iter().map(|(f, d)| FieldViolation::new(f, d)).collect();
        if more > 0 {
            list.push(FieldViolation::new("", more_text(more)));
        }
        details.set_bad_request(list);
    } else {
        let kind = screaming_snake(code);
        for (field, description) in violations {
            details.add_precondition_failure_violation(kind.clone(), field, description);
        }
        if more > 0 {
            details.add_precondition_failure_violation(kind, "", more_text(more));
        }
    }
    Status::with_error_details(code, message, details)
}

/// `FAILED_PRECONDITION` for `Code::FailedPrecondition`: the code's name, as a violation's type.
fn screaming_snake(code: Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

fn more_text(more: usize) -> String {
    format!("and {more} more problem{}", if more == 1 { "" } else { "s" })
}

/// `message` when it fits [`MAX_MESSAGE`], else its start and how long it was.
fn bounded_message(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_owned();
    }
    let note = format!(" (message cut: {} bytes in all)", message.len());
    format!("{}{note}", shorten(message, MAX_MESSAGE - note.len()))
}

fn all(errors: &ValidationErrors) -> Cow<'_, [FieldError]> {
    Cow::Borrowed(&errors.0)
}

impl ApiError for ValidationErrors {
    fn code(&self) -> Code {
        Code::InvalidArgument
    }
    fn problems(&self) -> Cow<'_, [FieldError]> {
        all(self)
    }
}

impl ApiError for VmError {
    fn code(&self) -> Code {
        match self {
            VmError::Invalid(_) => Code::InvalidArgument,
            VmError::NotFound(_) | VmError::NoDevice { .. } => Code::NotFound,
            VmError::AlreadyExists(_) => Code::AlreadyExists,
            VmError::WrongState { .. }
            | VmError::NoConsole { .. }
            | VmError::Orphan { .. }
            | VmError::VolumesInUse(_) => Code::FailedPrecondition,
            VmError::DetachTimeout { .. } => Code::DeadlineExceeded,
            // QEMU refused the device (an image in the wrong format, say): the request, not the node, must change.
            VmError::Hotplug { .. } => Code::FailedPrecondition,
            VmError::MigrationRefused { .. } => Code::FailedPrecondition,
            VmError::MigrationCancelled { .. } => Code::Cancelled,
            VmError::Migration { .. } => Code::Aborted,
            VmError::Persist { .. } | VmError::Start { .. } | VmError::Qmp { .. } => Code::Internal,
            VmError::GuestAgent { source, .. } => crate::grpc_guest::agent_code(source),
            VmError::GuestExecTimeout { .. } => Code::DeadlineExceeded,
            VmError::NoSnapshot { .. } => Code::NotFound,
            VmError::SnapshotExists { .. } => Code::AlreadyExists,
            VmError::SnapshotRefused(_) => Code::FailedPrecondition,
            VmError::Snapshot { .. } => Code::Internal,
        }
    }
    fn problems(&self) -> Cow<'_, [FieldError]> {
        match self {
            VmError::Invalid(errors) | VmError::VolumesInUse(errors) | VmError::SnapshotRefused(errors) => all(errors),
            _ => Cow::Borrowed(&[]),
        }
    }
}

impl ApiError for qx_devices::pci::InventoryError {
    /// sysfs that cannot be read or parsed is the host's problem, not the caller's.
    fn code(&self) -> Code {
        Code::Internal
    }
}

impl ApiError for NetworkError {
    fn code(&self) -> Code {
        match self {
            NetworkError::Invalid(_) => Code::InvalidArgument,
            NetworkError::NotFound(_) => Code::NotFound,
            NetworkError::AlreadyExists(_) => Code::AlreadyExists,
            NetworkError::InUse { .. } | NetworkError::OvnNotConfigured => Code::FailedPrecondition,
            NetworkError::Unreachable { .. } | NetworkError::OvnUnreachable { .. } => Code::Unavailable,
            NetworkError::Switch { .. } | NetworkError::Ovn { .. } | NetworkError::Persist { .. } => Code::Internal,
        }
    }
    fn problems(&self) -> Cow<'_, [FieldError]> {
        match self {
            NetworkError::Invalid(errors) => all(errors),
            _ => Cow::Borrowed(&[]),
        }
    }
}

impl ApiError for SecurityGroupError {
    fn code(&self) -> Code {
        match self {
            SecurityGroupError::Invalid(_) => Code::InvalidArgument,
            SecurityGroupError::NotFound(_) | SecurityGroupError::RuleNotFound { .. } => Code::NotFound,
            SecurityGroupError::AlreadyExists(_) => Code::AlreadyExists,
            SecurityGroupError::InUse { .. } => Code::FailedPrecondition,
            SecurityGroupError::Network(e) => e.code(),
            SecurityGroupError::Ovn { source: qx_net::ovn::Error::Invalid(_), .. } => Code::InvalidArgument,
            SecurityGroupError::Ovn { .. } | SecurityGroupError::Persist { .. } => Code::Internal,
        }
    }
    fn problems(&self) -> Cow<'_, [FieldError]> {
        match self {
            SecurityGroupError::Invalid(errors) => all(errors),
            SecurityGroupError::Network(e) => e.problems(),
            _ => Cow::Borrowed(&[]),
        }
    }
}

/// Storage errors by the kind the storage crate assigns.
impl ApiError for VolumeError {
    fn code(&self) -> Code {
        use qx_storage::ErrorKind;
        let kind = match self {
            VolumeError::PoolNotFound(_) => ErrorKind::NotFound,
            VolumeError::Engine(_) => ErrorKind::Internal,
            VolumeError::Pool(e) => e.kind(),
            VolumeError::Invalid(_) => ErrorKind::InvalidArgument,
            VolumeError::Vm(e) => return e.code(),
        };
        match kind {
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Cancelled => Code::Cancelled,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::Internal => Code::Internal,
        }
    }
    fn problems(&self) -> Cow<'_, [FieldError]> {
        match self {
            VolumeError::Pool(qx_storage::PoolError::Invalid { problems, .. }) | VolumeError::Invalid(problems) => {
                all(problems)
            }
            VolumeError::Vm(e) => e.problems(),
            _ => Cow::Borrowed(&[]),
        }
    }
}

impl ApiError for HostError {
    fn code(&self) -> Code {
        match self {
            HostError::Invalid(_) => Code::InvalidArgument,
            HostError::NetworkApply { .. }
            | HostError::NetworkParse { .. }
            | HostError::SshCommand { .. }
            | HostError::VmsRunning { .. }
            | HostError::ClusterMember { .. } => Code::FailedPrecondition,
            HostError::ClusterConnect { .. } => Code::Unavailable,
            HostError::ClusterRegister { code: Code::Unavailable | Code::DeadlineExceeded, .. } => Code::Unavailable,
            HostError::ClusterRegister { .. } | HostError::ClusterCertificates { .. } => Code::FailedPrecondition,
            HostError::ClusterTokenRefused { .. } => Code::PermissionDenied,
            HostError::NetworkRead { .. } | HostError::Persist { .. } => Code::Internal,
        }
    }
    fn problems(&self) -> Cow<'_, [FieldError]> {
        match self {
            HostError::Invalid(errors) => all(errors),
            _ => Cow::Borrowed(&[]),
        }
    }
}

impl ApiError for UpdateError {
    fn code(&self) -> Code {
        match self {
            UpdateError::Invalid(_) | UpdateError::Refused { .. } => Code::InvalidArgument,
            UpdateError::Unavailable(_)
            | UpdateError::Busy
            | UpdateError::OnTrial
            | UpdateError::VmsRunning { .. }
            | UpdateError::Key { .. }
            | UpdateError::NoPartition { .. } => Code::FailedPrecondition,
            UpdateError::Cancelled => Code::Cancelled,
            UpdateError::SourceChanged { .. } => Code::Aborted,
            UpdateError::WriteMismatch { .. } => Code::DataLoss,
            UpdateError::Io { .. } | UpdateError::GrubEnv(_) => Code::Internal,
        }
    }
    fn problems(&self) -> Cow<'_, [FieldError]> {
        match self {
            UpdateError::Invalid(errors) => all(errors),
            UpdateError::Refused { field, problem } => Cow::Owned(vec![FieldError::new(*field, "", problem.as_str())]),
            _ => Cow::Borrowed(&[]),
        }
    }
}

/// A bad request is the caller's; anything else is the node's certificate files.
impl ApiError for CertError {
    fn code(&self) -> Code {
        match self {
            CertError::Invalid { .. } => Code::InvalidArgument,
            _ => Code::FailedPrecondition,
        }
    }
    fn problems(&self) -> Cow<'_, [FieldError]> {
        match self {
            CertError::Invalid { field, problem } => Cow::Owned(vec![FieldError::new(*field, "", problem.as_str())]),
            _ => Cow::Borrowed(&[]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client receives: the status after a trip through the trailers' encoding.
    fn over_the_wire(status: Status) -> (Status, usize) {
        let mut headers = tonic::codegen::http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        let size = headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        (Status::from_header_map(&headers).expect("a status in the headers"), size)
    }

    #[test]
    fn two_hundred_bad_disks_and_a_huge_label_fit_the_trailers_with_every_field_named() {
        let mut problems = vec![FieldError::new("disks", 200, "is more than 16 disks")];
        problems
            .extend((0..200).map(|i| FieldError::new(format!("disks[{i}].path"), "/no/such/x.raw", "does not exist")));
        problems.push(FieldError::new("labels.big", "v".repeat(1 << 20), "is not a valid label value"));
        let error = VmError::Invalid(ValidationErrors(problems));
        let (status, size) = over_the_wire(status(error));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(size < 8 * 1024, "trailers of {size} bytes");
        assert!(status.message().len() <= MAX_MESSAGE, "{}", status.message());
        assert!(status.message().starts_with(r#"invalid VM spec: disks: "200" is more than 16 disks; disks[0].path"#));
        assert!(status.message().contains(" more problems"), "{}", status.message());

        let bad_request = status.get_details_bad_request().expect("BadRequest details");
        let violations = &bad_request.field_violations;
        assert_eq!(violations[0].field, "disks");
        assert_eq!(violations[0].description, r#""200" is more than 16 disks"#);
        assert_eq!(violations[1].field, "disks[0].path");
        assert!(violations.len() > 10, "{} violations", violations.len());
        let last = violations.last().unwrap();
        assert_eq!(last.field, "");
        assert_eq!(last.description, format!("and {} more problems", 202 - (violations.len() - 1)));
    }

    #[test]
    fn every_violation_is_attached_when_they_fit() {
        let error = ValidationErrors(vec![
            FieldError::new("labels.big", "v".repeat(1 << 20), "is not a valid label value"),
            FieldError::new("name", "a/b", "contains '/'"),
        ]);
        let (status, _) = over_the_wire(status(error));
        assert_eq!(status.code(), Code::InvalidArgument);
        let violations = status.get_details_bad_request().unwrap().field_violations;
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["labels.big", "name"]);
        assert!(violations[0].description.ends_with("…\" (1048576 bytes) is not a valid label value"));
        assert_eq!(violations[1].description, r#""a/b" contains '/'"#);
    }

    #[test]
    fn errors_that_name_no_field_carry_no_details_and_long_messages_are_cut() {
        let error = VmError::NotFound("n".repeat(100_000));
        let full = error.to_string().len();
        let (status, size) = over_the_wire(status(error));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.details().is_empty());
        assert!(size < 4 * 1024, "{size}");
        assert!(status.message().len() <= MAX_MESSAGE);
        assert!(status.message().ends_with(&format!("… (message cut: {full} bytes in all)")), "{}", status.message());
    }

    #[test]
    fn refusals_of_other_codes_carry_precondition_failures() {
        let error = VmError::VolumesInUse(ValidationErrors::one("disks[0].volume", "default/a", "is used by VM \"b\""));
        let (status, _) = over_the_wire(status(error));
        assert_eq!(status.code(), Code::FailedPrecondition);
        let failure = status.get_details_precondition_failure().expect("PreconditionFailure details");
        assert_eq!(failure.violations[0].subject, "disks[0].volume");
        assert_eq!(failure.violations[0].r#type, "FAILED_PRECONDITION");
    }
}
