// The page's two message lines: the alert (errors, read out at once) and the status (progress).

const alertBox = () => document.getElementById("alert");
const statusLine = () => document.getElementById("status");
const listeners = { rejectedKey: () => {} };

export const ui = {
  error(message) {
    alertBox().textContent = message;
    alertBox().hidden = false;
  },
  clearError() {
    alertBox().hidden = true;
    alertBox().textContent = "";
  },
  status(message) {
    statusLine().textContent = message;
  },
  onRejectedKey(callback) {
    listeners.rejectedKey = callback;
  },
  // Run an action; its failure becomes the alert line (a rejected key is reported to the shell too).
  async attempt(action) {
    try {
      return await action();
    } catch (error) {
      if (error.name === "AbortError") return undefined;
      ui.error(error.message);
      if (error.status === 401) listeners.rejectedKey();
      return undefined;
    }
  },
};
