// A small typed event emitter (no dependency, the same in browsers, Node and React Native).

/**
 * @template {Record<string, any>} Events
 */
export class Emitter {
  constructor() {
    /** @type {Map<keyof Events, Set<(payload: any) => void>>} */
    this._listeners = new Map();
  }

  /**
   * Call `listener` on every `name`; returns the function that unsubscribes it.
   * @template {keyof Events} K
   * @param {K} name
   * @param {(payload: Events[K]) => void} listener
   * @returns {() => void}
   */
  on(name, listener) {
    let set = this._listeners.get(name);
    if (!set) this._listeners.set(name, (set = new Set()));
    set.add(listener);
    return () => this.off(name, listener);
  }

  /**
   * @template {keyof Events} K
   * @param {K} name
   * @param {(payload: Events[K]) => void} listener
   */
  off(name, listener) {
    this._listeners.get(name)?.delete(listener);
  }

  /**
   * @template {keyof Events} K
   * @param {K} name
   * @param {Events[K]} payload
   */
  emit(name, payload) {
    const set = this._listeners.get(name);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(payload);
      } catch (error) {
        // A listener's bug must not break the stream: report it without stopping delivery.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}
