"""The boleto a customer can pay: the gateway issues it with a Pix code, Renova renders it in the
FEBRABAN layout (read back with pypdf), its barcode and QR code scan (pdftoppm + zbarimg, a real
scanner) to the boleto's 44 digits and its BR Code, the API serves it, the `boleto_issued` e-mail
carries it, and a payment by Pix on a Sunday pays the invoice that day."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from datetime import date

import pytest
from pypdf import PdfReader
from sqlalchemy import select

from jobs.billing_day import run_day
from jobs.boleto_pdf import formatted_line
from jobs.context import runtime
from models.boleto import barcode_from_digitable_line
from models.pix import parse_br_code
from models.schema import Boleto, GatewayEvent, Invoice, LedgerEntry, Notification, Subscription
from tests.integration.factories import make_organization, make_subscription, noon, seed_plans
from workers.mail import MailSink, read_messages

ISSUE_DAY = date(2028, 3, 3)  # T − 7 of a renewal on 2028-03-10


def issued(session, gateway) -> Boleto:
    seed_plans(session)
    organization = make_organization(session, 1, card_token=None, name="Padaria Pão Quente Ltda")
    make_subscription(session, organization, cycle="annual", method="boleto", anchor=date(2027, 3, 10))
    session.commit()
    run_day(session, gateway, ISSUE_DAY, noon(ISSUE_DAY), runtime().config)
    return session.scalars(select(Boleto)).one()


def tools() -> tuple[str, str]:
    found = shutil.which("pdftoppm"), shutil.which("zbarimg")
    if not all(found):
        if os.environ.get("CI"):
            pytest.fail("pdftoppm and zbarimg are required in CI (apt-get install poppler-utils zbar-tools)")
        pytest.skip("no pdftoppm/zbarimg here: apt-get install poppler-utils zbar-tools to scan the boleto")
    return found  # type: ignore[return-value]


def test_the_gateway_issues_a_boleto_hibrido(session, billing_gateway):
    boleto = issued(session, billing_gateway)

    code = parse_br_code(boleto.pix_code)
    assert code.amount_cents == boleto.amount_cents == 47_900
    assert code.txid == "".join(char for char in boleto.gateway_id if char.isalnum())[:25]


def test_the_pdf_is_a_febraban_boleto_that_scans(session, billing_gateway, api_client, tmp_path):
    boleto = issued(session, billing_gateway)
    invoice = session.get_one(Invoice, boleto.invoice_id)

    answer = api_client.get(f"/v1/invoices/{invoice.id}/boleto.pdf")

    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/pdf"
    again = api_client.get(f"/v1/invoices/{invoice.id}/boleto.pdf")
    assert again.content == answer.content and again.headers["etag"] == answer.headers["etag"]  # same bytes
    text = PdfReader(io.BytesIO(answer.content)).pages[0].extract_text()
    for expected in (
        "Recibo do Pagador",
        "Local de pagamento",
        "CONECTA Tecnologia Ltda",  # the beneficiary (settings)
        "11.222.333/0001-81",
        "Padaria Pão Quente Ltda",  # the payer
        boleto.nosso_numero,
        "10/03/2028",  # due
        "R$ 479,00",
        formatted_line(boleto.digitable_line),
        "Instruções",
        "sem multa e sem juros",
        "Pix Copia e Cola",
    ):
        assert expected in text, expected
    assert boleto.pix_code[:60] in text.replace("\n", "")

    pdftoppm, zbarimg = tools()
    (tmp_path / "boleto.pdf").write_bytes(answer.content)
    subprocess.run([pdftoppm, "-r", "200", "-png", "boleto.pdf", "page"], cwd=tmp_path, check=True, timeout=60)
    [page] = list(tmp_path.glob("page*.png"))
    from PIL import Image

    with Image.open(page) as image:
        dark = sum(1 for value in image.convert("L").tobytes() if value < 128)
        assert dark > image.width * image.height * 0.01  # not a blank page
    scanned = subprocess.run([zbarimg, "-q", str(page)], capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert f"I2/5:{boleto.barcode}" in scanned  # the barcode is the boleto's 44 digits…
    assert boleto.barcode == barcode_from_digitable_line(boleto.digitable_line)  # …those of its linha digitável
    assert f"QR-Code:{boleto.pix_code}" in scanned  # the QR code is its Pix code


def test_no_boleto_no_pdf(session, billing_gateway, api_client):
    boleto = issued(session, billing_gateway)
    assert api_client.get("/v1/invoices/999999/boleto.pdf").status_code == 404
    boleto.status = "canceled"
    session.commit()
    missing = api_client.get(f"/v1/invoices/{boleto.invoice_id}/boleto.pdf")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert (
        api_client.get(f"/v1/invoices/{boleto.invoice_id}/boleto.pdf", headers={"Authorization": ""}).status_code == 401
    )


def test_the_boleto_issued_e_mail_carries_the_pdf_and_the_pix_code(session, billing_gateway, api_client, tmp_path):
    from jobs.notice_delivery import deliver_notification
    from workers.mail import SmtpMailer

    boleto = issued(session, billing_gateway)
    notice = session.scalars(select(Notification).where(Notification.kind == "boleto_issued")).one()
    with MailSink(tmp_path / "mail") as sink:
        outcome = deliver_notification(
            session, notice.id, SmtpMailer(sink.url), "cobranca@conecta.example", noon(ISSUE_DAY)
        )
        session.commit()
        [message] = read_messages(tmp_path / "mail")

    assert outcome == "sent"
    body = message.get_body(preferencelist=("plain",)).get_content()
    assert boleto.pix_code in body and "Pix Copia e Cola" in body and "segue anexo" in body
    [attachment] = list(message.iter_attachments())
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_filename() == f"boleto-{boleto.nosso_numero}.pdf"
    served = api_client.get(f"/v1/invoices/{boleto.invoice_id}/boleto.pdf").content
    assert attachment.get_content() == served  # the same PDF as the API's


def test_a_pix_payment_on_a_sunday_pays_the_invoice_that_day(session, billing_gateway, sandbox_gateway):
    from jobs.gateway_events import record_gateway_event

    boleto = issued(session, billing_gateway)
    sunday = date(2028, 3, 5)
    assert sunday.weekday() == 6
    paid = sandbox_gateway.pay_boleto(boleto.gateway_id, paid_on=sunday, via="pix")
    event = next(
        delivery["event"] for delivery in sandbox_gateway.webhooks() if delivery["event_id"] == paid["event_id"]
    )
    assert event["data"]["via"] == "pix"
    session.add(GatewayEvent(event_id=event["id"], type=event["type"], payload=event))
    session.commit()

    assert record_gateway_event(session, event["id"], now=noon(sunday), config=runtime().config) == "paid"
    session.commit()
    invoice = session.get_one(Invoice, boleto.invoice_id)
    assert (invoice.status, invoice.paid_on) == ("paid", sunday)
    assert session.scalar(select(LedgerEntry.description).where(LedgerEntry.kind == "payment")) == "Pagamento (Pix)"
    assert session.scalar(select(Subscription.status)) == "active"
