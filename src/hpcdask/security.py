"""Per-cluster TLS credentials.

The scheduler creates a fresh CA and one cluster certificate (signed by that CA) in the
scheduler file's folder, private to its owner (folder 0700, files 0600). Every other role
given the same scheduler file loads them from there, so only holders of that folder (the
job's owner, on the shared filesystem) can talk to the cluster: mutual TLS, each side
verifying the other against the cluster's CA. The CA key is never written to disk.

The three files are one set: they are written into a new folder of their own
(``.tls-<id>``), then the link ``tls`` is switched to it in one rename, and a reader resolves
the link once, so no reader ever pairs a new certificate with an old key. The certificates
expire shortly after the job (:func:`not_after`), and :func:`remove` deletes them when the
cluster ends.
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security

from hpcdask.errors import BadInput
from hpcdask.files import atomic_write, private_dir

CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "cluster.pem", "cluster.key"
LINK, SET_PREFIX = "tls", ".tls-"
NO_END_DAYS = 30  # certificate lifetime when the job has no end time


@dataclass(frozen=True)
class Credentials:
    folder: Path  # the cluster's folder
    generation: str  # the set's own subfolder, where ``tls`` pointed when it was read

    @property
    def files(self) -> Path:
        return self.folder / self.generation

    @property
    def ca(self) -> Path:
        return self.files / CA_FILE

    @property
    def cert(self) -> Path:
        return self.files / CERT_FILE

    @property
    def key(self) -> Path:
        return self.files / KEY_FILE

    def security(self) -> Security:
        """A distributed ``Security`` for every role, encryption required."""
        ca, cert, key = str(self.ca), str(self.cert), str(self.key)
        return Security(
            require_encryption=True,
            tls_ca_file=ca,
            tls_client_cert=cert, tls_client_key=key,
            tls_scheduler_cert=cert, tls_scheduler_key=key,
            tls_worker_cert=cert, tls_worker_key=key,
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hpcdask"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def not_after(job_end: float | None, margin: float, now: float | None = None
              ) -> datetime.datetime:
    """When a cluster's certificates expire: the job's end plus ``margin`` seconds, or
    NO_END_DAYS from now when the job has no end time."""
    now = time.time() if now is None else now
    end = job_end + margin if job_end else now + NO_END_DAYS * 86400
    return datetime.datetime.fromtimestamp(max(end, now + margin), datetime.timezone.utc)


def create(folder: Path, cluster_id: str, expires: datetime.datetime | None = None
           ) -> Credentials:
    """Make a new CA and cluster certificate in ``folder`` (created private if missing), valid
    until ``expires`` (default: NO_END_DAYS), and make them the folder's current set."""
    folder = private_dir(folder, what="credentials folder")
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate small clock skew between nodes
    not_after = expires or now + datetime.timedelta(days=NO_END_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"hpcdask CA {cluster_id}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"hpcdask cluster {cluster_id}")).issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    generation = f"{SET_PREFIX}{cluster_id}-{os.urandom(4).hex()}"
    (folder / generation).mkdir(mode=0o700)
    creds = Credentials(folder, generation)
    atomic_write(creds.ca, ca_cert.public_bytes(pem))
    atomic_write(creds.cert, cert.public_bytes(pem))
    atomic_write(creds.key, key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    link = folder / f".{LINK}.{generation}.tmp"
    link.symlink_to(generation)
    os.replace(link, folder / LINK)  # the switch: one rename
    for old in folder.glob(f"{SET_PREFIX}*"):  # earlier clusters' sets
        if old.name != generation:
            shutil.rmtree(old, ignore_errors=True)
    return creds


def remove(creds: Credentials) -> None:
    """Delete a cluster's credentials when it ends (unless another set has replaced them)."""
    link = creds.folder / LINK
    try:
        if os.readlink(link) == creds.generation:
            link.unlink()
    except OSError:
        pass
    shutil.rmtree(creds.files, ignore_errors=True)


def current(folder: Path) -> Credentials | None:
    """The folder's current set (``tls`` resolved once), or None when it has none."""
    try:
        generation = os.readlink(Path(folder) / LINK)
    except OSError:
        return None
    if "/" in generation or not generation.startswith(SET_PREFIX):
        return None
    return Credentials(Path(folder), generation)


def _check_private(path: Path, kind: str, fix_mode: str) -> None:
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise BadInput(f"{kind} {path} belongs to uid {st.st_uid}, not you (uid {os.geteuid()}); "
                       f"use your own cluster folder")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise BadInput(f"{kind} {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable by others; "
                       f"make it private: chmod {fix_mode} {path}")


def load(folder: Path) -> Credentials:
    """The credentials in ``folder``, after checking they are private and really PEM."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"credentials folder {folder} does not exist; start the scheduler with "
                       f"the same --scheduler-file first (it creates the credentials)")
    _check_private(folder, "credentials folder", "700")
    creds = current(folder)
    if creds is None:
        raise BadInput(f"credentials folder {folder} holds no credentials ({LINK} is missing); "
                       f"the scheduler has ended or not started: restart it, or pass --no-tls "
                       f"to every role")
    _check_private(creds.files, "credentials folder", "700")
    for path in (creds.ca, creds.cert, creds.key):
        if not path.exists():
            raise BadInput(f"TLS file {path} is missing; restart the scheduler to recreate the "
                           f"cluster's credentials, or pass --no-tls to every role")
        _check_private(path, "TLS file", "600")
    for path in (creds.ca, creds.cert):
        try:
            x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            raise BadInput(f"TLS file {path} is not a PEM certificate; restart the scheduler to "
                           f"recreate the cluster's credentials") from None
    try:
        serialization.load_pem_private_key(creds.key.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise BadInput(f"TLS file {creds.key} is not an unencrypted PEM private key; restart the "
                       f"scheduler to recreate the cluster's credentials") from None
    return creds


def warn_no_tls(role: str) -> None:
    """The red line of a role started with --no-tls."""
    click.secho(
        f"hpcdask: WARNING: {role} runs WITHOUT TLS (--no-tls): anyone who can reach its port "
        f"can run code as you. Use it only on a network nobody else shares.",
        fg="red", bold=True, err=True)
