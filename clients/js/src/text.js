// The text a device shows for a run: the SDK's copy of protocol/text.py `shown_text`, the one
// reducer the node's snapshots, the worker's `run.resumed` and every client share.
//
// - `run.started` begins the text again (attempt > 1 is a restart after a worker died);
// - `token` appends its text (a merged token frame carries the joined texts of the seqs it covers);
// - `run.resumed` replaces the text with the whole answer so far;
// - every other event leaves it as it is.

import { Event } from "./vocabulary.js";

/**
 * The run's text after one of its events, from the text before it.
 * @param {string} text
 * @param {string} event
 * @param {object} data the event's data (`text` is read from `token` and `run.resumed`)
 * @returns {string}
 */
export function shownText(text, event, data) {
  if (event === Event.TOKEN) return text + String(/** @type {{ text?: unknown }} */ (data).text);
  if (event === Event.RUN_STARTED) return "";
  if (event === Event.RUN_RESUMED) return String(/** @type {{ text?: unknown }} */ (data).text);
  return text;
}

/**
 * Does this event alone make the run's text known (without what came before it)?
 * @param {string} event
 */
export function startsText(event) {
  return event === Event.RUN_STARTED || event === Event.RUN_RESUMED;
}
