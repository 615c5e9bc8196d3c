"""An SMTP server that takes mail only over STARTTLS from one authenticated user (aiosmtpd), and
writes each message it is given as a JSON line to stdout: the envelope, the login and the
parsed headers and body.

Usage: sink.py PORT CERT_FILE KEY_FILE USER PASSWORD
"""

import email
import email.policy
import json
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def main():
    port, cert, key, user, password = sys.argv[1:6]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == user
            and auth_data.password.decode() == password
        )
        return AuthResult(success=ok, auth_data=auth_data if ok else None)

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
            body = message.get_body(preferencelist=("plain", "html"))
            print(
                json.dumps(
                    {
                        "from": envelope.mail_from,
                        "to": envelope.rcpt_tos,
                        "login": session.auth_data.login.decode() if session.auth_data else None,
                        "tls": session.ssl is not None,
                        "subject": str(message["Subject"]),
                        "content_type": message.get_content_type(),
                        "body": body.get_content() if body is not None else "",
                    }
                ),
                flush=True,
            )
            return "250 OK"

    controller = Controller(
        Handler(),
        hostname="127.0.0.1",
        port=int(port),
        tls_context=context,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
        # PLAIN only: aiosmtpd's LOGIN challenges are not the "Username:" Go's client expects.
        auth_exclude_mechanism=["LOGIN", "CRAM-MD5"],
    )
    controller.start()
    print(json.dumps({"ready": True}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
