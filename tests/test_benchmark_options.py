"""The benchmark tools' shared options (cli/benchmarks.py): a size given on the command line wins over
--quick's defaults, and --quick's over Market's."""

import pytest

from torchreid_attrimeter.cli.benchmarks import (
    MARKET_SIZES,
    QUICK_SIZES,
    benchmark_parser,
    parse_benchmark_args,
)


def parse(argv):
    return parse_benchmark_args(benchmark_parser("test"), argv)


def test_without_options_the_sizes_are_markets():
    args = parse([])
    assert {name: getattr(args, name) for name in MARKET_SIZES} == MARKET_SIZES


def test_quick_fills_only_the_sizes_not_given():
    args = parse(["--quick", "--num-query", "60", "--dim", "32"])
    assert (args.num_query, args.dim) == (60, 32)
    assert (args.num_gallery, args.num_identities) == (QUICK_SIZES["num_gallery"], QUICK_SIZES["num_identities"])


def test_an_explicit_size_without_quick_wins_over_markets():
    args = parse(["--num-gallery", "500"])
    assert args.num_gallery == 500 and args.num_query == MARKET_SIZES["num_query"]


def test_a_size_that_is_not_positive_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--quick", "--num-query", "0"])
    assert exit_info.value.code == 2 and "--num-query must be a positive" in capsys.readouterr().err
