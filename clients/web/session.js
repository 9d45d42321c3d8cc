// Who is signed in on this page, and as which device.
//
// The token comes in the URL fragment (`/#token=<jwt>`): browsers never send the fragment to a
// server, so it is in no access log; it is taken out of the address bar at once (so it is not
// bookmarked, shared or left in the history) and kept in sessionStorage, which this tab alone reads,
// so a reload stays signed in. On a development cluster the dev login mints one for a user name.

const TOKEN = "chorus.token";
const DEV_USER = "chorus.devUser";
const DEVICE = "chorus.device";

/**
 * The token from the fragment (then removed from the address bar), or the one this tab kept.
 * @returns {string | null}
 */
export function takeToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token");
  if (token) {
    fragment.delete("token");
    const rest = fragment.toString();
    history.replaceState(history.state, "", `${location.pathname}${location.search}${rest ? `#${rest}` : ""}`);
    sessionStorage.setItem(TOKEN, token);
    sessionStorage.removeItem(DEV_USER); // a real token: nothing to mint again
    return token;
  }
  return sessionStorage.getItem(TOKEN);
}

/** The user name of a dev login in this tab, to mint a fresh token when the server refuses the old one. */
export function devUser() {
  return sessionStorage.getItem(DEV_USER);
}

/**
 * A token for `user` from the node's dev login (404 unless DEV_LOGIN is on).
 * @param {string} user
 * @returns {Promise<string>}
 */
export async function devLogin(user) {
  const response = await fetch("/dev/login", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ user }),
  });
  if (response.status === 404) {
    throw new Error("This server has no dev login (DEV_LOGIN is off): open the page with /#token=<jwt>.");
  }
  if (!response.ok) throw new Error(`Sign-in failed (${response.status}): ${(await response.text()).slice(0, 200)}`);
  const { token } = await response.json();
  sessionStorage.setItem(TOKEN, token);
  sessionStorage.setItem(DEV_USER, user);
  return token;
}

export function signOut() {
  sessionStorage.removeItem(TOKEN);
  sessionStorage.removeItem(DEV_USER);
}

/**
 * This tab's device id, the same across its reloads (presence lists it). Per tab, not per browser:
 * a device holds one socket, and two tabs sharing an id would take each other's presence (the
 * second tab's close would announce the first offline). crypto.getRandomValues, not randomUUID: the
 * page may be served over plain http to a phone on the LAN, where randomUUID does not exist.
 */
export function deviceId() {
  let id = sessionStorage.getItem(DEVICE);
  if (!id) {
    const bytes = crypto.getRandomValues(new Uint8Array(4));
    id = `web-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
    sessionStorage.setItem(DEVICE, id);
  }
  return id;
}
