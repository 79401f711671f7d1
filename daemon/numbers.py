"""Phone numbers: one national form to compare them in, and the never/only-record rules."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config checks rules with plain_number from here
    from linerec.daemon.config import NumbersConfig

NEVER_RECORD = "never_record"
NOT_IN_ONLY_RECORD = "not_in_only_record"
STORAGE_FULL = "storage_full"
"""Not a number rule: the storage guard's floor, which turns calls away in the same way."""


def plain_number(number: str) -> str:
    """A number as dialled: without the spaces, dashes, dots and brackets people write."""
    return re.sub(r"[\s\-.()/]", "", number)


def national_number(number: str, country_code: str) -> str:
    """``+31 20 123 4567`` and ``0031201234567`` become ``0201234567`` (for country code
    31); other numbers keep their international form."""
    plain = plain_number(number)
    for prefix in ("+" + country_code, "00" + country_code):
        if plain.startswith(prefix):
            return "0" + plain[len(prefix):]
    if plain.startswith("00"):
        return "+" + plain[2:]
    return plain


def number_matches(pattern: str, number: str, country_code: str) -> bool:
    """Does a rule (``*`` any digits, ``?`` one) match a number, both in national form?"""
    return fnmatchcase(national_number(number, country_code),
                       national_number(pattern, country_code))


class NumberRules:
    """Which calls may be recorded, by the far end's number."""

    def __init__(self, config: NumbersConfig) -> None:
        self._config = config

    def rule_for(self, number: str | None) -> str | None:
        """The rule that stops this call from being recorded, or None. An unknown number
        never matches a never-record rule, and never passes an only-record list."""
        config = self._config
        if number and any(number_matches(rule, number, config.country_code)
                          for rule in config.never_record):
            return NEVER_RECORD
        if config.only_record and not (number and any(
                number_matches(rule, number, config.country_code)
                for rule in config.only_record)):
            return NOT_IN_ONLY_RECORD
        return None
