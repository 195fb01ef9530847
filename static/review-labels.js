// The review form's labels field takes several labels, comma-separated; a <datalist>
// alone suggests only for the whole field (the first label). This script, loaded by
// templates/_reviews.html, offers the labels in use for the label being typed: each
// option is the field's text so far with a label in place of its last piece. Without
// it the form still works; the labels are only typed in full.

const input = document.getElementById("review-labels");
const options = document.getElementById("review-label-options");
if (input && options) offerLabels(input, options);

/** Keep the datalist's options matching the label after the last comma. */
function offerLabels(field, list) {
  const known = Array.from(list.options, (option) => option.value);
  const refresh = () => {
    const cut = field.value.lastIndexOf(",");
    const last = field.value.slice(cut + 1);
    // What precedes the label being typed, spaces included, so each option begins with
    // exactly the field's text (the browser only shows options that match it).
    const before = field.value.slice(0, cut + 1) + last.slice(0, last.length - last.trimStart().length);
    const typed = last.trim().toLowerCase();
    const chosen = new Set(
      before.split(",").map((label) => label.trim().toLowerCase()).filter(Boolean),
    );
    const matches = known.filter((label) => !chosen.has(label) && label.includes(typed));
    // Options are made as elements with a value: never HTML from the text.
    list.replaceChildren(
      ...matches.slice(0, 50).map((label) => {
        const option = document.createElement("option");
        option.value = before + label;
        return option;
      }),
    );
  };
  field.addEventListener("input", refresh);
  field.addEventListener("focus", refresh);
}
