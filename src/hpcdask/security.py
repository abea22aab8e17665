"""Per-cluster TLS credentials.

The scheduler creates a fresh CA and one cluster certificate (signed by that CA) in the
scheduler file's folder, private to its owner (folder 0700, files 0600). Every other role
given the same scheduler file loads them from there, so only holders of that folder (the
job's owner, on the shared filesystem) can talk to the cluster: mutual TLS, each side
verifying the other against the cluster's CA. The CA key is never written to disk.
"""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security

from hpcdask.errors import BadInput
from hpcdask.files import atomic_write, private_dir

CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "cluster.pem", "cluster.key"


@dataclass(frozen=True)
class Credentials:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / CA_FILE

    @property
    def cert(self) -> Path:
        return self.folder / CERT_FILE

    @property
    def key(self) -> Path:
        return self.folder / KEY_FILE

    def remove(self) -> None:
        """Delete the three files (the folder stays: it may hold other things)."""
        for path in (self.ca, self.cert, self.key):
            path.unlink(missing_ok=True)

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


def create(folder: Path, cluster_id: str, days: int = 30) -> Credentials:
    """Make a new CA and cluster certificate in ``folder`` (created private if missing)."""
    folder = private_dir(folder, what="credentials folder")
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate small clock skew between nodes
    not_after = now + datetime.timedelta(days=days)

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
    atomic_write(folder / CA_FILE, ca_cert.public_bytes(pem))
    atomic_write(folder / CERT_FILE, cert.public_bytes(pem))
    atomic_write(folder / KEY_FILE, key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return Credentials(folder)


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
    creds = Credentials(folder)
    if not folder.is_dir():
        raise BadInput(f"credentials folder {folder} does not exist; start the scheduler with "
                       f"the same --scheduler-file first (it creates the credentials)")
    _check_private(folder, "credentials folder", "700")
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
