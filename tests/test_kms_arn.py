"""KMS identifier parsing and multi-Region matching: pure functions, no server."""

from __future__ import annotations

import pytest

from aioenvelope.keyrings.kms_arn import is_mrk_identifier, mrk_match, parse_arn

KEY = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
MRK_W2 = "arn:aws:kms:us-west-2:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab"
MRK_E1 = "arn:aws:kms:eu-west-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab"


def test_key_arn_parses_into_its_parts() -> None:
    arn = parse_arn(KEY)
    assert arn is not None
    assert (arn.partition, arn.region, arn.account, arn.resource_type) == (
        "aws",
        "us-west-2",
        "111122223333",
        "key",
    )
    assert str(arn) == KEY


def test_alias_arn_keeps_slashes_in_its_name() -> None:
    arn = parse_arn("arn:aws-cn:kms:cn-north-1:111122223333:alias/team/app")
    assert arn is not None
    assert (arn.partition, arn.resource_type, arn.resource_id) == ("aws-cn", "alias", "team/app")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "alias/name",
        "1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:s3:::bucket/key",
        "arn:aws:kms:us-west-2:111122223333:grant/x",
        "arn:aws:kms::111122223333:key/x",
        "arn:aws:kms:us-west-2:111122223333:key",
        "arn:aws:kms:us-west-2:111122223333:key/",
    ],
)
def test_non_kms_arns_are_not_parsed(text: str) -> None:
    assert parse_arn(text) is None


def test_replicas_of_a_multi_region_key_match_across_regions() -> None:
    assert mrk_match(MRK_W2, MRK_E1)
    assert is_mrk_identifier(MRK_E1)
    assert is_mrk_identifier("mrk-1234")


def test_single_region_keys_match_only_themselves() -> None:
    other_region = KEY.replace("us-west-2", "eu-west-1")
    assert mrk_match(KEY, KEY)
    assert not mrk_match(KEY, other_region)
    assert not is_mrk_identifier(KEY)


def test_multi_region_keys_of_other_accounts_or_ids_do_not_match() -> None:
    assert not mrk_match(MRK_W2, MRK_E1.replace("111122223333", "444455556666"))
    assert not mrk_match(MRK_W2, MRK_E1.replace("mrk-1234", "mrk-9999"))
