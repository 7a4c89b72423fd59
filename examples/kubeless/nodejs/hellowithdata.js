module.exports = {
  handler: function (event, context) {
    console.log(event);
    return event.data;
  }
}
