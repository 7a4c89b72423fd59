import humanize


def foo(event, context):
    return humanize.intword(int(event["data"]["n"]))
