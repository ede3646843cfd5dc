"""The boleto a customer prints or opens in the bank app: FEBRABAN's layout — the recibo do pagador
above the cut line, the ficha de compensação below it with the barcode (Interleaved 2 of 5 of the
44-digit code, reportlab's `I2of5`) — and, on a boleto híbrido, the Pix QR code (segno) with its
"copia e cola" text.

Made from the boleto's row (with its invoice, the payer's organization and the beneficiary's
settings) alone: the same boleto always gives the same bytes (`invariant` PDF), so each is rendered
once per process and cached by the hash of what it shows.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from datetime import date
from threading import Lock
from typing import TYPE_CHECKING, Final

from sqlalchemy.orm import Session

from models.boleto import bank_code_check_digit
from models.calendar import format_date_br
from models.dunning import overdue_on, payable_until, suspend_on
from models.money import format_brl
from models.policy import format_document
from models.schema import Boleto, Invoice, Notification, Organization
from models.states import BoletoStatus

if TYPE_CHECKING:
    from reportlab.pdfgen.canvas import Canvas

# Points per millimetre (reportlab's `mm`): reportlab itself is imported only to render, so that every
# process importing the notices does not pay for it.
mm: Final = 72 / 25.4
A4: Final = (210 * mm, 297 * mm)

# Narrow bar and wide:narrow ratio of the barcode: 44 digits in about 12 cm, FEBRABAN's 1:3.
NARROW_BAR: Final = 0.3 * mm
WIDE_RATIO: Final = 3.0
BAR_HEIGHT: Final = 13 * mm
CACHE_SIZE: Final = 256
LAYOUT_VERSION: Final = "1"


@dataclass(frozen=True)
class Beneficiary:
    """Who receives the money, as printed on every boleto (settings `BENEFICIARY_*`)."""

    name: str
    document: str  # CNPJ
    address: str
    agency_code: str  # agência / código do beneficiário
    wallet: str  # carteira


@dataclass(frozen=True)
class BoletoSlip:
    """Everything a boleto's PDF shows, and nothing else: its content hash names the PDF."""

    bank_code: str
    digitable_line: str
    barcode: str
    nosso_numero: str
    document_number: str
    document_date: date
    processing_date: date
    due_date: date
    amount_cents: int
    payer_name: str
    payer_document: str
    beneficiary: Beneficiary
    instructions: tuple[str, ...]
    pix_code: str | None

    @property
    def content_hash(self) -> str:
        data = json.dumps({"layout": LAYOUT_VERSION, **asdict(self)}, default=str, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()


def slip_for(
    session: Session, boleto_id: int, beneficiary: Beneficiary, *, grace_business_days: int
) -> BoletoSlip | None:
    boleto = session.get(Boleto, boleto_id)
    if boleto is None:
        return None
    invoice = session.get_one(Invoice, boleto.invoice_id)
    organization = session.get_one(Organization, invoice.organization_id)
    until = payable_until(boleto.due_date)
    suspended_from = suspend_on(overdue_on(invoice.due_date), grace_business_days)
    instructions = (
        f"Pagável em qualquer banco até {format_date_br(until)} sem encargos.",
        "Após o vencimento: sem multa e sem juros. O pagamento continua sendo aceito, mas a assinatura",
        f"CONECTA é suspensa a partir de {format_date_br(suspended_from)} se ele não for identificado.",
        "Pague também com Pix, em qualquer dia e horário, pelo QR Code ao lado." if boleto.pix_code else "",
        f"Fatura {invoice.id}: CONECTA, período de {format_date_br(invoice.period_start)} "
        f"a {format_date_br(invoice.period_end)}.",
    )
    created = boleto.created_at.date()
    return BoletoSlip(
        bank_code=boleto.barcode[:3],
        digitable_line=boleto.digitable_line,
        barcode=boleto.barcode,
        nosso_numero=boleto.nosso_numero,
        document_number=str(invoice.id),
        document_date=created,
        processing_date=created,
        due_date=boleto.due_date,
        amount_cents=boleto.amount_cents,
        payer_name=organization.name,
        payer_document=format_document(organization.document) if organization.document else "",
        beneficiary=beneficiary,
        instructions=tuple(line for line in instructions if line),
        pix_code=boleto.pix_code,
    )


# Notices whose e-mail carries the boleto's PDF (the boleto named in the notice, while still payable).
ATTACHING_KINDS: Final = frozenset({"boleto_issued", "boleto_reminder", "boleto_overdue", "subscription_suspended"})


def boleto_attachments(session: Session, notification: Notification) -> list[tuple[str, bytes]]:
    """[("boleto-<nosso número>.pdf", PDF)] for a notice about a boleto that can still be paid, else []."""
    from jobs.context import NotConfigured, runtime

    boleto_id = notification.context.get("boleto_id")
    if notification.kind not in ATTACHING_KINDS or not isinstance(boleto_id, int):
        return []
    beneficiary = runtime().beneficiary
    if beneficiary is None:
        raise NotConfigured("the runtime has no beneficiary to print on boletos (BENEFICIARY_* settings)")
    boleto = session.get(Boleto, boleto_id)
    if boleto is None or boleto.status not in (BoletoStatus.ISSUED, BoletoStatus.OVERDUE):
        return []
    slip = slip_for(session, boleto_id, beneficiary, grace_business_days=runtime().config.boleto_grace_business_days)
    return [] if slip is None else [(f"boleto-{slip.nosso_numero}.pdf", boleto_pdf(slip))]


def formatted_line(line: str) -> str:
    """The linha digitável in its printed groups: `AAAAA.AAAAA BBBBB.BBBBBB CCCCC.CCCCCC D EEEEEEEEEEEEEE`."""
    digits = "".join(char for char in line if char.isdigit())
    return (
        f"{digits[0:5]}.{digits[5:10]} {digits[10:15]}.{digits[15:21]} {digits[21:26]}.{digits[26:32]} "
        f"{digits[32]} {digits[33:]}"
    )


# --- rendering -----------------------------------------------------------------------------------------


_cache: OrderedDict[str, bytes] = OrderedDict()
_cache_lock = Lock()


def boleto_pdf(slip: BoletoSlip) -> bytes:
    """The PDF of `slip`, rendered once per process and content."""
    key = slip.content_hash
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    pdf = render(slip)
    with _cache_lock:
        _cache[key] = pdf
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return pdf


LEFT: Final = 10 * mm
WIDTH: Final = 190 * mm
RIGHT_COLUMN: Final = 45 * mm
ROW: Final = 9 * mm


class _Page:
    def __init__(self, canvas: Canvas) -> None:
        self.canvas = canvas

    def box(self, x: float, top: float, width: float, height: float, label: str, value: str = "", *,
            bold: bool = False, align_right: bool = False) -> None:  # fmt: skip
        canvas = self.canvas
        canvas.setLineWidth(0.5)
        canvas.rect(x, top - height, width, height)
        canvas.setFont("Helvetica", 6)
        canvas.drawString(x + 1 * mm, top - 2.6 * mm, label)
        canvas.setFont("Helvetica-Bold" if bold else "Helvetica", 9)
        if align_right:
            canvas.drawRightString(x + width - 1.5 * mm, top - height + 2 * mm, value)
        else:
            canvas.drawString(x + 1.5 * mm, top - height + 2 * mm, value)

    def header(self, top: float, slip: BoletoSlip, title: str) -> None:
        canvas = self.canvas
        canvas.setFont("Helvetica-Bold", 12)
        canvas.drawString(LEFT, top - 6 * mm, f"Banco {slip.bank_code}")
        canvas.setLineWidth(1.2)
        canvas.line(LEFT + 38 * mm, top - 8 * mm, LEFT + 38 * mm, top - 1 * mm)
        canvas.line(LEFT + 58 * mm, top - 8 * mm, LEFT + 58 * mm, top - 1 * mm)
        canvas.setFont("Helvetica-Bold", 14)
        canvas.drawCentredString(
            LEFT + 48 * mm, top - 6.5 * mm, f"{slip.bank_code}-{bank_code_check_digit(slip.bank_code)}"
        )
        canvas.setFont("Helvetica-Bold", 10.5)
        canvas.drawRightString(LEFT + WIDTH, top - 6 * mm, formatted_line(slip.digitable_line) if title else "")
        if not title:
            canvas.setFont("Helvetica-Bold", 10)
            canvas.drawRightString(LEFT + WIDTH, top - 6 * mm, "Recibo do Pagador")
        canvas.setLineWidth(1.2)
        canvas.line(LEFT, top - 8 * mm, LEFT + WIDTH, top - 8 * mm)


def render(slip: BoletoSlip) -> bytes:
    from io import BytesIO

    from reportlab.graphics.barcode.common import I2of5
    from reportlab.pdfgen.canvas import Canvas

    buffer = BytesIO()
    canvas = Canvas(buffer, pagesize=A4, invariant=1, pageCompression=1)
    canvas.setTitle(f"Boleto {slip.nosso_numero}")
    canvas.setAuthor(slip.beneficiary.name)
    page = _Page(canvas)
    beneficiary = slip.beneficiary
    amount = format_brl(slip.amount_cents)
    wide = WIDTH - RIGHT_COLUMN
    line = formatted_line(slip.digitable_line)

    # --- recibo do pagador -------------------------------------------------------------------------
    top = 287 * mm
    page.header(top, slip, "")
    top -= 8 * mm
    page.box(LEFT, top, wide, ROW, "Beneficiário", f"{beneficiary.name} — CNPJ {beneficiary.document}")
    page.box(LEFT + wide, top, RIGHT_COLUMN, ROW, "Vencimento", format_date_br(slip.due_date), bold=True,
             align_right=True)  # fmt: skip
    top -= ROW
    page.box(LEFT, top, wide, ROW, "Pagador", f"{slip.payer_name} — CPF/CNPJ {slip.payer_document or '—'}")
    page.box(LEFT + wide, top, RIGHT_COLUMN, ROW, "Agência / Código do beneficiário", beneficiary.agency_code,
             align_right=True)  # fmt: skip
    top -= ROW
    third = wide / 3
    page.box(LEFT, top, third, ROW, "Nº do documento", slip.document_number)
    page.box(LEFT + third, top, third, ROW, "Data do documento", format_date_br(slip.document_date))
    page.box(LEFT + 2 * third, top, third, ROW, "Data do processamento", format_date_br(slip.processing_date))
    page.box(LEFT + wide, top, RIGHT_COLUMN, ROW, "Nosso número", slip.nosso_numero, align_right=True)
    top -= ROW
    page.box(LEFT, top, wide, ROW, "Linha digitável", line)
    page.box(LEFT + wide, top, RIGHT_COLUMN, ROW, "(=) Valor do documento", amount, bold=True, align_right=True)
    top -= ROW
    canvas.setFont("Helvetica", 6)
    canvas.drawRightString(LEFT + WIDTH, top - 3 * mm, "Autenticação mecânica")

    # --- the cut line -------------------------------------------------------------------------------
    cut = top - 12 * mm
    canvas.setDash(2, 2)
    canvas.setLineWidth(0.5)
    canvas.line(LEFT, cut, LEFT + WIDTH, cut)
    canvas.setDash()
    canvas.setFont("Helvetica", 6)
    canvas.drawRightString(LEFT + WIDTH, cut + 1 * mm, "Corte na linha pontilhada")

    # --- ficha de compensação -------------------------------------------------------------------------
    top = cut - 6 * mm
    page.header(top, slip, "ficha")
    top -= 8 * mm
    place = "Pagável em qualquer banco até o vencimento" + (" — ou com Pix, a qualquer hora" if slip.pix_code else "")
    page.box(LEFT, top, wide, ROW, "Local de pagamento", place)
    page.box(LEFT + wide, top, RIGHT_COLUMN, ROW, "Vencimento", format_date_br(slip.due_date), bold=True,
             align_right=True)  # fmt: skip
    top -= ROW
    page.box(LEFT, top, wide, ROW, "Beneficiário",
             f"{beneficiary.name} — CNPJ {beneficiary.document} — {beneficiary.address}")  # fmt: skip
    page.box(LEFT + wide, top, RIGHT_COLUMN, ROW, "Agência / Código do beneficiário", beneficiary.agency_code,
             align_right=True)  # fmt: skip
    top -= ROW
    fifth = wide / 5
    for index, (label, value) in enumerate(
        (
            ("Data do documento", format_date_br(slip.document_date)),
            ("Nº do documento", slip.document_number),
            ("Espécie doc.", "DS"),
            ("Aceite", "N"),
            ("Data do processamento", format_date_br(slip.processing_date)),
        )
    ):
        page.box(LEFT + index * fifth, top, fifth, ROW, label, value)
    page.box(LEFT + wide, top, RIGHT_COLUMN, ROW, "Nosso número", slip.nosso_numero, align_right=True)
    top -= ROW
    for index, (label, value) in enumerate(
        (("Uso do banco", ""), ("Carteira", beneficiary.wallet), ("Espécie", "R$"), ("Quantidade", ""), ("Valor", ""))
    ):
        page.box(LEFT + index * fifth, top, fifth, ROW, label, value)
    page.box(LEFT + wide, top, RIGHT_COLUMN, ROW, "(=) Valor do documento", amount, bold=True, align_right=True)
    top -= ROW

    # Instructions on the left; the right column's boxes; the Pix QR code inside the instructions.
    block = 5 * ROW
    canvas.rect(LEFT, top - block, wide, block)
    canvas.setFont("Helvetica", 6)
    canvas.drawString(LEFT + 1 * mm, top - 2.6 * mm, "Instruções (texto de responsabilidade do beneficiário)")
    canvas.setFont("Helvetica", 8)
    for index, text in enumerate(slip.instructions):
        canvas.drawString(LEFT + 1.5 * mm, top - 7 * mm - index * 4 * mm, text)
    deductions = (
        "(-) Desconto / Abatimento",
        "(-) Outras deduções",
        "(+) Mora / Multa",
        "(+) Outros acréscimos",
        "(=) Valor cobrado",
    )
    for index, label in enumerate(deductions):
        page.box(LEFT + wide, top - index * ROW, RIGHT_COLUMN, ROW, label)
    if slip.pix_code:
        _draw_qr(canvas, slip.pix_code, x=LEFT + wide - 33 * mm, y=top - block + 2 * mm, size=31 * mm)
    top -= block
    page.box(LEFT, top, WIDTH, ROW + 3 * mm, "Pagador",
             f"{slip.payer_name} — CPF/CNPJ {slip.payer_document or '—'}")  # fmt: skip
    canvas.setFont("Helvetica", 6)
    canvas.drawRightString(LEFT + WIDTH - 1.5 * mm, top - 2.6 * mm, "Sacador / Avalista: —")
    top -= ROW + 3 * mm
    canvas.setFont("Helvetica", 6)
    canvas.drawRightString(LEFT + WIDTH, top - 3 * mm, "Autenticação mecânica — Ficha de Compensação")
    if slip.pix_code:
        canvas.drawString(LEFT, top - 3 * mm, "Pix Copia e Cola:")
        canvas.setFont("Courier", 6)
        for index, start in enumerate(range(0, len(slip.pix_code), 80)):
            canvas.drawString(LEFT + 18 * mm, top - 3 * mm - index * 2.8 * mm, slip.pix_code[start : start + 80])
        top -= 2.8 * mm * (len(slip.pix_code) // 80)

    barcode = I2of5(
        slip.barcode, barWidth=NARROW_BAR, ratio=WIDE_RATIO, barHeight=BAR_HEIGHT, checksum=0, bearers=0,
        quiet=0, stop=1,
    )  # fmt: skip
    barcode.drawOn(canvas, LEFT, top - 12 * mm - BAR_HEIGHT)
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()


def _draw_qr(canvas: Canvas, payload: str, *, x: float, y: float, size: float) -> None:
    """The QR code of `payload` as vector squares (with its quiet zone), bottom-left at (x, y)."""
    import segno

    code = segno.make(payload, error="m", micro=False)
    matrix = list(code.matrix_iter(scale=1, border=4))
    module = size / len(matrix)
    canvas.setFillColorRGB(1, 1, 1)
    canvas.rect(x, y, size, size, stroke=0, fill=1)
    canvas.setFillColorRGB(0, 0, 0)
    for row_index, row in enumerate(matrix):
        for column, dark in enumerate(row):
            if dark:
                canvas.rect(x + column * module, y + size - (row_index + 1) * module, module, module, stroke=0, fill=1)
    canvas.setFont("Helvetica-Bold", 6)
    canvas.drawCentredString(x + size / 2, y + size + 1 * mm, "Pague com Pix")
