"""The job actors, one module per job of the contract."""

from __future__ import annotations

from actors.digital_river_events import DigitalRiverEvents
from actors.line_item_fulfillment import LineItemFulfillment
from actors.log_cleanup import LogCleanup
from actors.order_fulfillment import OrderFulfillment
from actors.recurring_payments import RecurringPayments
from actors.subscription_installments import SubscriptionInstallments
from engine.jobs import Job, Services

# The jobs this version implements, by contract name, in pipeline order.
JOB_CLASSES: dict[str, type[Job]] = {
    SubscriptionInstallments.job_name: SubscriptionInstallments,
    RecurringPayments.job_name: RecurringPayments,
    OrderFulfillment.job_name: OrderFulfillment,
    LineItemFulfillment.job_name: LineItemFulfillment,
    DigitalRiverEvents.job_name: DigitalRiverEvents,
    LogCleanup.job_name: LogCleanup,
}


def build_jobs(services: Services) -> dict[str, Job]:
    """One actor per implemented job, in pipeline order."""
    return {name: cls(services) for name, cls in JOB_CLASSES.items()}
