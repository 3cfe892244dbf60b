"""The bibliography's entry labels in author-year form, matching the in-text citations.

sphinxcontrib-bibtex cites author-year in the text (``bibtex_reference_style: author_year``) but
labels the list with pybtex's "alpha" labels (``[BLeonardC13]``) unless told otherwise. This
registers the pybtex style "authoryear": pybtex's unsrt formatting (which links ``eprint`` to
arXiv and ``doi`` to doi.org), entries sorted by author and year, labelled "Nagel et al. 2021".
"""

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle


def _last_name(person) -> str:
    return Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as("text")


class AuthorYearLabels(BaseLabelStyle):
    """"Gray and Neuhoff 1998", "Nagel et al. 2021"; "a"/"b" appended where two labels collide."""

    def format_labels(self, sorted_entries):
        labels = [self._label(e) for e in sorted_entries]
        for i, label in enumerate(labels):
            same = [j for j, other in enumerate(labels) if other == label]
            yield label if len(same) == 1 else label + "abcdefghij"[same.index(i)]

    @staticmethod
    def _label(entry) -> str:
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_last_name(p) for p in people]
        if not names:
            who = entry.key
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        return f"{who} {entry.fields.get('year', 'n.d.')}"


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabels
    default_sorting_style = SortingStyle


def setup(app):
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
